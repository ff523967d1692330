"""Calibration/evaluation text: stream a text file into token ids (stopping at --max-tokens) and cut windows."""

from __future__ import annotations

import codecs
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moec.core.errors import MoecError

CHUNK_CHARS = 1 << 20          # text is tokenized in pieces of about this size, cut at whitespace
MAX_UNBOUNDED_BYTES = 1 << 30  # without --max-tokens, refuse to tokenize more than this


@dataclass
class TokenStream:
    """Token ids read from a data file, with the sha256 and size of the bytes consumed."""

    ids: list[int]
    sha256: str
    bytes_read: int


def _open_data(path: str | os.PathLike, max_tokens: int | None):
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise MoecError(f"data file '{p}' does not exist") from None
    except OSError as exc:
        raise MoecError(f"cannot read data file '{p}': {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise MoecError(f"data path '{p}' is a directory; expected a UTF-8 text file")
    if not stat.S_ISREG(st.st_mode) and max_tokens is None:
        raise MoecError(f"data '{p}' is not a regular file (a device or pipe); pass --max-tokens to read "
                        "only the first tokens of a stream")
    try:
        return open(p, "rb")
    except OSError as exc:
        raise MoecError(f"cannot read data file '{p}': {exc.strerror or exc}") from None


def check_data_file(path: str | os.PathLike, max_tokens: int | None = None) -> None:
    """The cheap checks of a data file (exists, readable, not a directory; a stream needs
    ``max_tokens``), as one-line errors, before any slow stage."""
    _open_data(path, max_tokens).close()


def stream_token_ids(tok: Tokenizer, path: str | os.PathLike, max_tokens: int | None = None,
                     chunk_chars: int = CHUNK_CHARS) -> TokenStream:
    """The first ``max_tokens`` token ids of a UTF-8 text file (all of them if None), read in pieces.

    Reading stops as soon as ``max_tokens`` ids exist, so a huge file or an endless device costs
    only what is used. Pieces are cut after whitespace, so a file smaller than one piece gives
    exactly the ids of encoding it whole.
    """
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2):
        raise MoecError(f"--max-tokens must be an integer >= 2, got {max_tokens!r}")
    p = Path(path)
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    h, nbytes, ids, carry, seen_text = hashlib.sha256(), 0, [], "", False
    with _open_data(p, max_tokens) as f:
        while max_tokens is None or len(ids) < max_tokens:
            raw = f.read(chunk_chars)
            nbytes += len(raw)
            if max_tokens is None and nbytes > MAX_UNBOUNDED_BYTES:
                raise MoecError(f"data file '{p}' is larger than {MAX_UNBOUNDED_BYTES >> 30} GiB; "
                                "pass --max-tokens to use its beginning")
            h.update(raw)
            try:
                text = carry + dec.decode(raw, final=not raw)
            except UnicodeDecodeError:
                raise MoecError(f"data file '{p}' is not UTF-8 text") from None
            if not raw:
                piece, carry = text, ""
            else:
                cut = max(text.rfind(" "), text.rfind("\n"))
                if cut <= 0 or len(text) - cut > chunk_chars:  # no whitespace: cut anyway, bounded memory
                    cut = len(text)
                piece, carry = text[:cut], text[cut:]
            seen_text = seen_text or bool(piece.strip())
            if piece:
                ids.extend(tok.encode(piece).ids)
            if not raw:
                break
    if not seen_text:
        raise MoecError(f"data file '{p}' is empty")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return TokenStream(ids, h.hexdigest(), nbytes)


def read_text(path: str | os.PathLike) -> str:
    """A whole (regular, UTF-8, non-empty) text file."""
    p = Path(path)
    with _open_data(p, None) as f:
        raw = f.read(MAX_UNBOUNDED_BYTES + 1)
    if len(raw) > MAX_UNBOUNDED_BYTES:
        raise MoecError(f"data file '{p}' is larger than {MAX_UNBOUNDED_BYTES >> 30} GiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MoecError(f"data file '{p}' is not UTF-8 text") from None
    if not text.strip():
        raise MoecError(f"data file '{p}' is empty")
    return text


def windows_from_ids(ids: list[int], seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len + 1] (inputs are [:, :-1], targets [:, 1:]) over at most
    ``max_tokens`` ids.

    A text shorter than one window gives a single shorter window; fewer than two tokens
    is an error because nothing can be predicted.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise MoecError("sequence length must be >= 1")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise MoecError("data file has fewer than two tokens; nothing to evaluate")
    ids_t = torch.tensor(ids, dtype=torch.long)
    n = (len(ids) - 1) // seq_len
    if n == 0:
        return ids_t[None, :]
    return torch.stack([ids_t[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])


def context_chunks(ids: list[int], n_ctx: int, bos: int | None = None) -> torch.Tensor:
    """The windows llama.cpp's ``llama-perplexity -c n_ctx`` evaluates: ``[len(ids) // n_ctx, n_ctx]``.

    Consecutive non-overlapping chunks of ``n_ctx`` ids, the tail that does not fill a chunk dropped;
    with ``bos`` (a vocabulary that adds a BOS token) the first id of every chunk is replaced by it,
    as llama.cpp does. Score them with ``evaluate_windows(..., score_from=n_ctx // 2)`` to score the
    same positions as llama.cpp.
    """
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 2:
        raise MoecError("context length must be an integer >= 2")
    n = len(ids) // n_ctx
    if n == 0:
        raise MoecError(f"{len(ids)} tokens do not fill one context window of {n_ctx}")
    chunks = torch.tensor(ids[:n * n_ctx], dtype=torch.long).reshape(n, n_ctx)
    if bos is not None:
        chunks[:, 0] = bos
    return chunks


def token_windows(tok: Tokenizer, text: str, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Windows (see ``windows_from_ids``) of an in-memory text, using at most ``max_tokens`` tokens."""
    if seq_len < 1:
        raise MoecError("sequence length must be >= 1")
    return windows_from_ids(tok.encode(text).ids, seq_len, max_tokens)


def file_windows(tok: Tokenizer, path: str | os.PathLike, seq_len: int, max_tokens: int | None = None,
                 max_position: int | None = None) -> tuple[torch.Tensor, str]:
    """(windows, sha256 of the bytes read) of a data file, streamed; ``seq_len`` must fit ``max_position``."""
    if max_position is not None and seq_len > max_position:
        raise MoecError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({max_position})")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise MoecError("sequence length must be >= 1")
    stream = stream_token_ids(tok, path, max_tokens)
    return windows_from_ids(stream.ids, seq_len), stream.sha256
