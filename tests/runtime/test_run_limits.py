"""moec run on a signed compiled bundle: --trust, position limits, bounded --max-new-tokens, non-finite logits."""

from __future__ import annotations

import numpy as np
import pytest

from moec.core.errors import MoecError
from tests.cli_helpers import assert_one_line_error, run

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    from moec.artifact.signing import generate_keypair
    from tests.conftest import make_tiny_checkpoint
    root = tmp_path_factory.mktemp("limits")
    make_tiny_checkpoint(root / "ckpt", max_position=48)
    priv, pub = generate_keypair(root / "key")
    code, out = run("compile", root / "ckpt", "--plan", "uniform:8", "--out", root / "b", "--sign", priv)
    assert code == 0, out
    return root / "b", pub, root


def test_signed_bundle_runs_with_trust(signed):
    bundle, pub, root = signed
    code, out = run("run", bundle, "--prompt", "The quick brown", "--max-new-tokens", 4, "--trust", pub)
    assert code == 0 and out.startswith("The quick brown"), out
    code, out = run("inspect", "--verify", bundle, "--trust", pub)
    assert code == 0 and "signature verified" in out, out
    code, out = run("keygen", root / "key")
    assert_one_line_error(code, out, "already exists")


def test_positions_beyond_the_model_limit_are_refused(signed):
    bundle, _, _ = signed
    code, out = run("run", bundle, "--prompt", "The quick brown fox jumps " * 20)
    assert_one_line_error(code, out, "max_position_embeddings (48)")
    code, out = run("run", bundle, "--prompt", "The quick", "--max-new-tokens", 47)
    assert_one_line_error(code, out, "max_position_embeddings (48)")
    code, out = run("run", bundle, "--prompt", "The quick", "--max-new-tokens", 40)
    assert code == 0, out


@pytest.mark.parametrize("n", [-1, 0, 10**12])
def test_max_new_tokens_is_bounded(signed, n):
    code, out = run("run", signed[0], "--prompt", "The", "--max-new-tokens", n)
    assert code == 2 and "--max-new-tokens" in out, out


def test_non_finite_logits_stop_with_an_error(signed, monkeypatch):
    from moec.runtime.session import BundleSession
    with BundleSession(signed[0]) as sess:
        ids = sess.tokenizer.encode("The quick").ids
        monkeypatch.setattr(sess, "prefill", lambda t: np.full(sess.cfg["vocab_size"], np.nan, np.float32))
        with pytest.raises(MoecError, match="non-finite logits"):
            sess.generate(ids, 4)
