"""Data files are tokenized as a stream that stops at --max-tokens (exactly N tokens), devices need a bound."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from moec.core.errors import MoecError
from moec.models.tokenizer import load_tokenizer
from moec.profile.data import stream_token_ids, windows_from_ids
from tests.cli_helpers import assert_one_line_error, run
from tests.conftest import TEXT


def test_huge_one_line_file_reads_only_what_max_tokens_needs(tiny_checkpoint, tmp_path):
    big = tmp_path / "big.txt"
    line = TEXT.replace("\n", " ")
    with open(big, "w") as f:
        for _ in range(40_000_000 // len(line)):
            f.write(line)
    tok = load_tokenizer(tiny_checkpoint)
    tracemalloc.start()
    s = stream_token_ids(tok, big, max_tokens=512)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(s.ids) == 512
    assert s.bytes_read <= 2 << 20 and peak < 64 << 20  # one or two pieces of 1 MiB, not 40 MB
    assert s.ids == tok.encode(line * 3).ids[:512]


def test_small_file_matches_whole_encoding_and_max_tokens_is_exact(tiny_checkpoint, text_file):
    tok = load_tokenizer(tiny_checkpoint)
    assert stream_token_ids(tok, text_file).ids == tok.encode(text_file.read_text()).ids
    assert stream_token_ids(tok, text_file, chunk_chars=100).ids[:200] == tok.encode(text_file.read_text()).ids[:200]
    for n in (2, 17, 100):
        ids = stream_token_ids(tok, text_file, max_tokens=n).ids
        assert len(ids) == n
        w = windows_from_ids(ids, 8)
        assert w[:, :-1].numel() + 1 <= n  # windows share their boundary token
    code, out = run("eval", text_file.parent / "tiny", "--data", text_file, "--max-tokens", 101, "--seq-len", 10,
                    "--json")
    assert code == 0, out
    assert json.loads(out)["tokens"] == 100  # 101 tokens give exactly 100 predictions


def test_devices_and_bad_paths(tiny_checkpoint, tmp_path):
    tok = load_tokenizer(tiny_checkpoint)
    s = stream_token_ids(tok, "/dev/zero", max_tokens=64)
    assert len(s.ids) == 64
    with pytest.raises(MoecError, match="not a regular file"):
        stream_token_ids(tok, "/dev/zero")
    code, out = run("eval", tiny_checkpoint, "--data", "/dev/zero", "--max-tokens", 64, "--seq-len", 16)
    assert code == 0, out
    code, out = run("eval", tiny_checkpoint, "--data", tmp_path, "--max-tokens", 64)
    assert code != 0
    for bad, needle in ((b"\xff\xfe", "not UTF-8"), (b"   \n", "empty")):
        f = tmp_path / "bad.txt"
        f.write_bytes(bad)
        code, out = run("eval", tiny_checkpoint, "--data", f)
        assert_one_line_error(code, out, needle)
    code, out = run("eval", tiny_checkpoint, "--data", tmp_path / "none.txt")
    assert_one_line_error(code, out, "does not exist")


def test_seq_len_beyond_max_position_is_refused(tmp_path, text_file):
    from tests.conftest import make_tiny_checkpoint
    make_tiny_checkpoint(tmp_path / "short", max_position=32)
    code, out = run("eval", tmp_path / "short", "--data", text_file, "--seq-len", 64)
    assert_one_line_error(code, out, "max_position_embeddings (32)")
    code, out = run("profile", tmp_path / "short", "--data", text_file, "--seq-len", 64, "--out", tmp_path / "p.json")
    assert_one_line_error(code, out, "max_position_embeddings (32)")
