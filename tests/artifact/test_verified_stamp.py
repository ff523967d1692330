"""--trust-verified: unchanged files skip re-hashing; a file changed after stamping is still caught."""

from __future__ import annotations

import os

import pytest

from moec.artifact import bundle as bundle_mod
from moec.artifact.bundle import verify_bundle
from moec.core.errors import MoecError
from tests.artifact.bundle_fixtures import make_marker_bundle, rewrite_manifest
from tests.cli_helpers import assert_one_line_error, run


@pytest.fixture
def stamped(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEC_VERIFIED_DIR", str(tmp_path / "stamps"))
    b = make_marker_bundle(tmp_path)
    verify_bundle(b, trust_verified=True)
    hashed = []
    real = bundle_mod._hash_nofollow
    monkeypatch.setattr(bundle_mod, "_hash_nofollow", lambda p: hashed.append(p.name) or real(p))
    return b, hashed


def _rewrite_in_place(path, offset: int) -> None:
    """Flip one byte without changing size or mtime (what a careful tamperer would do)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_unchanged_files_are_not_hashed_again(stamped):
    b, hashed = stamped
    verify_bundle(b, trust_verified=True)
    assert hashed == []
    verify_bundle(b)  # without the flag every file is hashed, stamp or not
    assert sorted(hashed) == ["lib.so", "weights.bin"]


def test_file_changed_after_stamping_is_caught(stamped):
    b, hashed = stamped
    _rewrite_in_place(b / "weights.bin", 3)
    with pytest.raises(MoecError, match="weights.bin' does not match its sha256"):
        verify_bundle(b, trust_verified=True)
    assert hashed == ["weights.bin"]


def test_changed_lib_after_stamping_runs_no_code(stamped, tmp_path, monkeypatch):
    b, _ = stamped
    marker = tmp_path / "marker"
    monkeypatch.setenv("MOEC_TEST_MARKER", str(marker))
    _rewrite_in_place(b / "lib.so", 100)
    code, out = run("run", b, "--prompt", "hi", "--trust-verified")
    assert_one_line_error(code, out, "sha256")
    assert not marker.exists()


def test_new_manifest_does_not_reuse_the_stamp(stamped):
    b, hashed = stamped
    rewrite_manifest(b, lambda m: m.update(created_by="someone else"))
    verify_bundle(b, trust_verified=True)
    assert sorted(hashed) == ["lib.so", "weights.bin"]
