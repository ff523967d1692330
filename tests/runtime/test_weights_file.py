"""Bundle weights file: aligned, hashed per tensor, mapped without copies; old bundles refused by version."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moec.artifact.bundle import read_manifest, write_bundle
from tests.artifact.bundle_fixtures import tiny_manifest
from moec.artifact.weights_file import ALIGN, WeightsReader, device_params, write_arrays
from moec.core.errors import MoecError


def _arrays():
    rng = np.random.default_rng(0)
    return [("a.packed", rng.integers(0, 255, (7, 13), dtype=np.uint8)),
            ("a.scale", rng.random((7, 3)).astype(np.float16)), ("norm", rng.random(5).astype(np.float32)),
            ("empty", np.zeros((0, 4), np.int32))]


def test_roundtrip_alignment_and_hashes(tmp_path):
    arrays = _arrays()
    write_arrays(tmp_path, arrays)
    r = WeightsReader(tmp_path)
    assert r.order == [n for n, _ in arrays]
    for name, arr in arrays:
        got = r.array(name, verify=True)
        assert got.dtype == arr.dtype and got.shape == arr.shape and np.array_equal(got, arr)
        assert r.tensors[name]["offset"] % ALIGN == 0
    data = bytearray((tmp_path / "weights.bin").read_bytes())
    data[r.tensors["norm"]["offset"]] ^= 0xFF
    (tmp_path / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(MoecError, match="'norm' does not match its sha256"):
        WeightsReader(tmp_path).array("norm", verify=True)


def test_device_params_share_the_mapping(tmp_path):
    import tvm

    arrays = [("w", np.arange(64, dtype=np.float32).reshape(8, 8))]
    write_arrays(tmp_path, arrays)
    (t,) = device_params(tmp_path, ["w"], tvm.runtime.cpu(), zero_copy=True)
    np.testing.assert_array_equal(t.numpy(), arrays[0][1])
    (c,) = device_params(tmp_path, ["w"], tvm.runtime.cpu(), zero_copy=False)
    np.testing.assert_array_equal(c.numpy(), arrays[0][1])


def test_old_bundle_names_its_version(tmp_path):
    src = tmp_path / "w.npz"
    np.savez(src, x=np.zeros(3))
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"\x7fELF not loaded")
    bundle = write_bundle(tmp_path / "b", {"lib.so": lib, "weights.npz": src}, tiny_manifest())
    mf = bundle / "manifest.json"
    m = json.loads(mf.read_text())
    m["format_version"] = 1
    mf.write_text(json.dumps(m))
    with pytest.raises(MoecError) as ei:
        read_manifest(bundle)
    assert "format version 1 (weights.npz) is not supported" in str(ei.value) and "\n" not in str(ei.value)
