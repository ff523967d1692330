"""`moec eval BUNDLE`: a compiled bundle's own decode logits, scored like the torch model's."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from moec.cli.main import cli

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """A tiny checkpoint, a text, and its uniform:4 bundle (float32 activations; int8 too where VNNI exists)."""
    from tvm.target import codegen

    from moec.lower.kernels.factory import host_target
    from tests.conftest import TEXT, make_tiny_checkpoint
    root = tmp_path_factory.mktemp("bundle_eval")
    ckpt = root / "ckpt"
    make_tiny_checkpoint(ckpt, seed=5)
    text = root / "text.txt"
    text.write_text(TEXT)
    out = {}
    modes = ["float32"] + (["int8"] if codegen.target_has_features("avx512vnni", host_target()) else [])
    for acts in modes:
        res = CliRunner().invoke(cli, ["compile", str(ckpt), "--plan", "uniform:4", "--out", str(root / acts),
                                       "--target", "host", "--activations", acts])
        assert res.exit_code == 0, res.output
        out[acts] = root / acts
    return ckpt, text, out


def _eval(*args) -> dict:
    res = CliRunner().invoke(cli, ["eval", *map(str, args), "--seq-len", "32", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_float32_bundle_scores_like_the_fake_quantized_checkpoint(bundles):
    """The bundle computes the plan's weights in float32: the same perplexity and top-1 as torch's fake
    quantization on the same windows (up to float summation order)."""
    ckpt, text, out = bundles
    torch_side = _eval(ckpt, "--data", text, "--plan", "uniform:4")
    bundle_side = _eval(out["float32"], "--data", text)
    assert bundle_side["tokens"] == torch_side["tokens"] > 100
    assert bundle_side["perplexity"] == pytest.approx(torch_side["perplexity"], rel=1e-4)
    assert bundle_side["top1"] == pytest.approx(torch_side["top1"], abs=2 / torch_side["tokens"])
    assert bundle_side["activations"] == "float32" and bundle_side["bundle_bytes"] > 0
    float_model = _eval(ckpt, "--data", text)
    assert bundle_side["perplexity"] != pytest.approx(float_model["perplexity"], rel=1e-4)  # really quantized


def test_int8_activations_are_scored_from_their_own_kernels(bundles):
    _, text, out = bundles
    if "int8" not in out:
        pytest.skip("int8-activation kernels need AVX-512 VNNI")
    exact, fast = _eval(out["float32"], "--data", text), _eval(out["int8"], "--data", text)
    assert fast["activations"] == "int8"
    assert fast["perplexity"] != exact["perplexity"]
    assert fast["perplexity"] == pytest.approx(exact["perplexity"], rel=0.05)


def test_max_tokens_limits_the_windows(bundles):
    _, text, out = bundles
    assert _eval(out["float32"], "--data", text, "--max-tokens", "70")["tokens"] == 2 * 32


@pytest.mark.parametrize("args, message", [
    (["--method", "rtn"], "--method quantize a checkpoint"),
    (["--plan", "uniform:2"], "nested"),
    (["--max-memory-gb", "1"], "--max-memory-gb applies to checkpoints"),
    (["--seq-len", "100000"], "max_position_embeddings"),
])
def test_bad_bundle_options_are_one_line_errors(bundles, args, message):
    _, text, out = bundles
    res = CliRunner().invoke(cli, ["eval", str(out["float32"]), "--data", str(text), *args])
    assert res.exit_code != 0 and message in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
