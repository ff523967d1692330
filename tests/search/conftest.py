"""Fixtures: a tiny checkpoint with a profile that carries proxy sensitivity."""

from __future__ import annotations

import pytest

from tests.conftest import TEXT, make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_profiled(tmp_path_factory):
    from moec import api

    root = tmp_path_factory.mktemp("search")
    ckpt = root / "ckpt"
    make_tiny_checkpoint(ckpt, seed=5)
    data = root / "data.txt"
    data.write_text(TEXT)
    prof = root / "profile.json"
    api.profile(ckpt, api.DataConfig(data, 64, None, 8), out=prof, progress=False,
                sensitivity=api.SensitivityConfig("proxy", (2, 3, 4, 8), 32, "rtn"))
    return ckpt, data, prof
