"""Fixtures shared by the fine-tuning tests."""

from __future__ import annotations

import pytest

from tests.conftest import TEXT, make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A folder with a tiny checkpoint (``src``) and calibration text (``data.txt``), one per test module."""
    root = tmp_path_factory.mktemp("ft")
    make_tiny_checkpoint(root / "src", hidden_size=32, expert_intermediate=32)
    (root / "data.txt").write_text(TEXT)
    return root
