"""Calibration/evaluation text: read a text file and cut it into token windows."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moec.core.errors import MoecError


def read_text(path: str | os.PathLike) -> str:
    p = Path(path)
    if not p.is_file():
        raise MoecError(f"data file '{p}' does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MoecError(f"data file '{p}' is not UTF-8 text") from None
    if not text.strip():
        raise MoecError(f"data file '{p}' is empty")
    return text


def token_windows(tok: Tokenizer, text: str, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len + 1] (inputs are [:, :-1], targets [:, 1:]).

    A text shorter than one window gives a single shorter window; fewer than two tokens
    is an error because nothing can be predicted.
    """
    if seq_len < 1:
        raise MoecError("sequence length must be >= 1")
    ids = tok.encode(text).ids
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    if len(ids) < 2:
        raise MoecError("data file has fewer than two tokens; nothing to evaluate")
    ids_t = torch.tensor(ids, dtype=torch.long)
    n = (len(ids) - 1) // seq_len
    if n == 0:
        return ids_t[None, :]
    return torch.stack([ids_t[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])
