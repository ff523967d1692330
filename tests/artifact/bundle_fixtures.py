"""A bundle whose lib.so is a tiny C library with a constructor that writes a marker file.

If any code path dlopens such a library, ``$MOEC_TEST_MARKER`` appears: tests use it to prove
that tampered bundles never get their code run. No TVM build is needed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from moec.artifact.bundle import write_bundle
from moec.core.config import MoEConfig
from moec.core.plan import uniform_plan

CTOR = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void moec_marker(void) {
    const char *p = getenv("MOEC_TEST_MARKER");
    if (p) { FILE *f = fopen(p, "a"); if (f) { fputs("%s\n", f); fclose(f); } }
}
"""


def marker_lib(path: Path, tag: str = "foreign code ran") -> Path:
    src = path.with_suffix(".c")
    src.write_text(CTOR % tag)
    try:
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(path), str(src)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no C compiler to build the marker library")
    return path


def tiny_manifest() -> dict:
    cfg = MoEConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, num_experts=2,
                    top_k=1, expert_intermediate=16)
    return {"model": {"architecture": cfg.architecture, "fingerprint": cfg.fingerprint(), "config": cfg.to_dict()},
            "plan": uniform_plan(cfg, 4, group_size=16).to_json(),
            "target": {"name": "host", "family": "cpu", "rpc_key": "host"}, "tvm_target": "llvm",
            "tvm_version": "0", "moec_version": "0", "created_by": "test", "created_at": "2026-01-01T00:00:00Z",
            "entry": {"decode": "decode"}, "params": ["p0"], "eos_token_id": None, "weight_bytes": 4}


def make_marker_bundle(root: Path, sign_key: Path | None = None) -> Path:
    """A schema-valid bundle at ``root/bundle`` whose lib.so writes the marker when loaded."""
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    lib = marker_lib(src / "lib.so")
    (src / "weights.bin").write_bytes(b"\0" * 16)
    return write_bundle(root / "bundle", {"lib.so": lib, "weights.bin": src / "weights.bin"}, tiny_manifest(),
                        sign_key=sign_key)


def rewrite_manifest(bundle: Path, edit) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    edit(m)
    (bundle / "manifest.json").write_text(json.dumps(m))
