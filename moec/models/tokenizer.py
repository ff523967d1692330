"""Tokenizer loading from a checkpoint or bundle directory (tokenizer.json via `tokenizers`)."""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer

from moec.core.errors import MoecError


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The ``tokenizer.json`` in directory ``path``."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise MoecError(f"'{path}' has no tokenizer.json")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise MoecError(f"cannot read {file}: {exc}") from None


def eos_id(tok: Tokenizer) -> int | None:
    for name in ("<|endoftext|>", "</s>", "<eos>"):
        idx = tok.token_to_id(name)
        if idx is not None:
            return idx
    return None
