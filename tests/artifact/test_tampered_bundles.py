"""Tampered bundles: each variant is refused with one line and its lib.so constructor never runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moec.artifact.bundle import verify_bundle
from moec.artifact.signing import generate_keypair
from tests.artifact.bundle_fixtures import make_marker_bundle, marker_lib, rewrite_manifest
from tests.cli_helpers import assert_one_line_error, run


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _swap_lib(b: Path, tmp: Path, rehash: bool) -> None:
    evil = marker_lib(tmp / "evil.so", "evil lib.so ran")
    shutil.copyfile(evil, b / "lib.so")
    new = {"sha256": _sha(evil)} if rehash else {}  # without: same size, so only the sha256 can tell
    rewrite_manifest(b, lambda m: m["files"]["lib.so"].update(bytes=evil.stat().st_size, **new))


def _unlisted(b, tmp):
    shutil.copyfile(b / "lib.so", b / "evil.so")


def _symlink(b, tmp):
    evil = marker_lib(tmp / "evil.so")
    (b / "lib.so").unlink()
    os.symlink(evil, b / "lib.so")
    rewrite_manifest(b, lambda m: m["files"]["lib.so"].update(sha256=_sha(evil), bytes=evil.stat().st_size))


def _traversal(b, tmp):
    outside = b.parent / "outside.so"
    shutil.copyfile(b / "lib.so", outside)
    rewrite_manifest(b, lambda m: m["files"].update({"../outside.so": dict(m["files"]["lib.so"])}))


def _absolute(b, tmp):
    rewrite_manifest(b, lambda m: m["files"].update({"/etc/passwd": dict(m["files"]["lib.so"])}))


def _duplicate_key(b, tmp):
    evil = marker_lib(tmp / "evil.so")
    text = (b / "manifest.json").read_text()
    good = json.dumps(json.loads(text)["files"]["lib.so"])
    fake = json.dumps({"sha256": _sha(evil), "bytes": evil.stat().st_size})
    (b / "manifest.json").write_text(text.replace('"files": {', f'"files": {{"lib.so": {fake}, "lib.so": {good}, ', 1)
                                     if '"files": {' in text else text)
    shutil.copyfile(evil, b / "lib.so")


def _fifo(b, tmp):
    os.mkfifo(b / "pipe")


def _extra_dir(b, tmp):
    (b / "sub").mkdir()


VARIANTS = {
    "unlisted file": (_unlisted, "not listed"),
    "lib.so entry removed": (lambda b, t: rewrite_manifest(b, lambda m: m["files"].pop("lib.so")), "lib.so"),
    "files is empty": (lambda b, t: rewrite_manifest(b, lambda m: m.update(files={})), "lists no files"),
    "symlinked lib.so": (_symlink, "symbolic link"),
    "path traversal entry": (_traversal, "leaves the bundle"),
    "absolute path entry": (_absolute, "leaves the bundle"),
    "lib.so swapped, hash kept": (lambda b, t: _swap_lib(b, t, False), "sha256"),
    "lib.so swapped, size kept": (lambda b, t: rewrite_manifest(b, lambda m: m["files"]["lib.so"].update(bytes=1)),
                                  "bytes"),
    "duplicate manifest key": (_duplicate_key, "duplicate key"),
    "unknown manifest field": (lambda b, t: rewrite_manifest(b, lambda m: m.update(loader="x")), "unknown field"),
    "malformed sha256": (lambda b, t: rewrite_manifest(b, lambda m: m["files"]["lib.so"].update(sha256="AB")),
                         "malformed sha256"),
    "format_version true": (lambda b, t: rewrite_manifest(b, lambda m: m.update(format_version=True)), "version"),
    "manifest is a symlink": (lambda b, t: (shutil.move(b / "manifest.json", t / "m.json"),
                                            os.symlink(t / "m.json", b / "manifest.json")), "symbolic link"),
    "fifo in bundle": (_fifo, "not a regular file"),
    "stray directory": (_extra_dir, "not part of the bundle"),
    "manifest not JSON": (lambda b, t: (b / "manifest.json").write_text("{"), "not valid JSON"),
}
SIGNED = {
    "rewritten hash, --trust": (lambda b, t: _swap_lib(b, t, True), "signature does not match"),
    "signed by another key": ("other", "signature does not match"),
    "unsigned bundle, --trust": ("unsigned", "not signed"),
    "garbage signature": (lambda b, t: (b / "manifest.sig").write_text("!!\n"), "malformed"),
}


@pytest.fixture
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return generate_keypair(d / "key"), generate_keypair(d / "other")


def _check_refused(bundle: Path, marker: Path, needle: str, trust: Path | None = None) -> None:
    extra = ["--trust", trust] if trust else []
    for args in (["run", bundle, "--prompt", "hi", *extra], ["run", bundle, "--prompt", "hi", "--trust-verified", *extra],
                 ["inspect", bundle, *extra], ["inspect", "--verify", bundle, *extra]):
        code, out = run(*args)
        assert_one_line_error(code, out, needle)
    assert not marker.exists(), "a tampered lib.so was loaded"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tampered_bundle_runs_no_code(variant, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("MOEC_TEST_MARKER", str(marker))
    monkeypatch.setenv("MOEC_VERIFIED_DIR", str(tmp_path / "stamps"))
    bundle = make_marker_bundle(tmp_path)
    verify_bundle(bundle, trust_verified=True)  # stamped while intact: the stamp must not excuse the tampering
    edit, needle = VARIANTS[variant]
    edit(bundle, tmp_path)
    _check_refused(bundle, marker, needle)


@pytest.mark.parametrize("variant", sorted(SIGNED))
def test_signature_variants_run_no_code(variant, tmp_path, monkeypatch, keys):
    (priv, pub), (other, _) = keys
    marker = tmp_path / "marker"
    monkeypatch.setenv("MOEC_TEST_MARKER", str(marker))
    edit, needle = SIGNED[variant]
    key = None if edit == "unsigned" else other if edit == "other" else priv
    bundle = make_marker_bundle(tmp_path, sign_key=key)
    if callable(edit):
        edit(bundle, tmp_path)
    _check_refused(bundle, marker, needle, trust=pub)


def test_intact_bundle_verifies_and_its_code_does_run(tmp_path, keys):
    """The control: an intact, signed bundle passes verification and loading it runs the constructor,
    so the marker would reveal any tampered library that got loaded."""
    (priv, pub), _ = keys
    bundle = make_marker_bundle(tmp_path, sign_key=priv)
    code, out = run("inspect", "--verify", bundle, "--trust", pub)
    assert code == 0 and "signature verified" in out, out
    marker = tmp_path / "marker"
    env = {**os.environ, "MOEC_TEST_MARKER": str(marker), "PYTHONPATH": str(Path(__file__).parents[2])}
    res = subprocess.run([sys.executable, "-m", "moec", "run", str(bundle), "--prompt", "hi", "--trust", str(pub)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert marker.read_text() == "foreign code ran\n", res.stderr
    assert res.returncode != 0 and res.stderr.strip().count("\n") == 0, res.stderr  # not a TVM module: one line
