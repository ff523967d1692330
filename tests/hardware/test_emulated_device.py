"""An aarch64 bundle on the emulated arm64 device (qemu-user TVM RPC server) through a stock tracker.

Bundles come from the real presets (aarch64-generic, raspberry-pi-5) and the host preset, under
one plan; the device is set up once and cached ($MOEC_EMU_DIR or ~/.cache/moec/arm64-emu): the first run
downloads an arm64 Debian userland and the aarch64 TVM wheel (about 2.5 minutes), later runs
reuse it. As root the missing Debian packages are installed with apt-get.
"""

from __future__ import annotations

import json
import platform

import numpy as np
import pytest
from click.testing import CliRunner

from moec.cli.main import cli
from moec.core.errors import MoecError
from moec.core.plan import BitPlan
from tests.hardware.emulated_fixtures import KEY

# one xdist worker runs every test of the emulated device, so the session fixture boots it once
pytestmark = [pytest.mark.tvm, pytest.mark.farm, pytest.mark.xdist_group("arm64-emu")]

PROMPT = "Experts in a mixture"
NEW_TOKENS = 8
ARM_PRESETS = ("aarch64-generic", "raspberry-pi-5")  # NEON; NEON + dotprod (qemu's default CPU has both)


def _build_bundles(root) -> dict:
    """Host and aarch64 bundles of one tiny MoE under one mixed-precision plan (2/3/4/8/16 bits)."""
    from moec import api
    from tests.conftest import make_tiny_checkpoint
    cfg = make_tiny_checkpoint(root / "ckpt", seed=5)
    bits = [2, 3, 4, 8, 16]
    plan = BitPlan({l: {e: bits[(l + e) % 5] for e in range(cfg.num_experts)} for l in cfg.moe_layers},
                   {"attention": 8, "lm_head": 4, "embeddings": 8}, group_size=32, method="mse",
                   model_fingerprint=cfg.fingerprint())
    (root / "plan.json").write_text(json.dumps(plan.to_json()))
    return {target: api.compile_bundle(api.CompileConfig(root / "ckpt", root / target, target, root / "plan.json",
                                                         activations="float32"))
            for target in ("host", *ARM_PRESETS)}


@pytest.fixture(scope="module")
def farm(emulated_boot, tmp_path_factory):
    """(running emulated device, bundles): the device boots under qemu while the bundles compile."""
    bundles = _build_bundles(tmp_path_factory.mktemp("emu-bundles"))
    return emulated_boot.result(), bundles


@pytest.fixture(scope="module")
def device(farm):
    return farm[0]


@pytest.fixture(scope="module")
def bundles(farm):
    return farm[1]


def _trace(sess, prompt_ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding that also keeps every step's logits."""
    sess.reset()
    logits = [sess.step(t) for t in prompt_ids]
    ids: list[int] = []
    while len(ids) < n:
        ids.append(int(np.argmax(logits[-1])))
        if len(ids) < n:
            logits.append(sess.step(ids[-1]))
    return ids, logits


@pytest.mark.parametrize("preset", ARM_PRESETS)
def test_aarch64_bundle_matches_host(device, bundles, preset):
    from moec.runtime.remote import elf_machine
    from moec.runtime.session import open_remote_bundle
    from moec.runtime.session import BundleSession
    assert elf_machine(bundles[preset] / "lib.so") == "aarch64"
    host = BundleSession(bundles["host"])
    prompt = host.tokenizer.encode(PROMPT).ids
    want_ids, want_logits = _trace(host, prompt, NEW_TOKENS)
    with open_remote_bundle(bundles[preset], str(device.tracker_address), KEY, timeout=60) as remote:
        got_ids, got_logits = _trace(remote, prompt, NEW_TOKENS)
        assert remote.generate(prompt, NEW_TOKENS)[0] == want_ids
    assert got_ids == want_ids
    assert len(got_logits) == len(want_logits) == len(prompt) + NEW_TOKENS - 1
    for got, want in zip(got_logits, want_logits):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_cli_run_remote_prints_host_text(device, bundles):
    args = ["--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS)]
    local = CliRunner().invoke(cli, ["run", str(bundles["host"]), *args])
    assert local.exit_code == 0, local.output
    res = CliRunner().invoke(cli, ["run", str(bundles["aarch64-generic"]), "--rpc", str(device.tracker_address),
                                   "--key", KEY, "--timeout", "60", *args])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0] == local.stdout.splitlines()[0]
    assert "on remote device via tracker" in res.stderr


def test_x86_bundle_on_arm_device_is_a_clear_error(device, bundles):
    if platform.machine() != "x86_64":
        pytest.skip("the host bundle is only a foreign library for the device on an x86_64 host")
    res = CliRunner().invoke(cli, ["run", str(bundles["host"]), "--rpc", str(device.tracker_address),
                                   "--key", KEY, "--prompt", PROMPT])
    assert res.exit_code == 2
    assert "built for x86_64" in res.output and "remote device" in res.output
    assert len(res.output.strip().splitlines()) == 1
    # the device is still usable afterwards
    from moec.runtime.session import open_remote_bundle
    with open_remote_bundle(bundles["aarch64-generic"], str(device.tracker_address), KEY, timeout=20) as sess:
        assert sess.step(1).shape == (sess.cfg["vocab_size"],)


def test_unknown_key_fails_at_once(device, bundles):
    res = CliRunner().invoke(cli, ["run", str(bundles["aarch64-generic"]), "--rpc", str(device.tracker_address),
                                   "--key", "jetson-nowhere", "--prompt", PROMPT])
    assert res.exit_code == 2
    assert "no device with key 'jetson-nowhere'" in res.output and f"{KEY} (1)" in res.output


def test_aarch64_bundle_on_this_host_is_a_clear_error(bundles):
    if platform.machine() == "aarch64":
        pytest.skip("this host is aarch64")
    from moec.runtime.session import BundleSession
    with pytest.raises(MoecError, match="built for aarch64.*--rpc"):
        BundleSession(bundles["aarch64-generic"])


@pytest.fixture(scope="module")
def pi5_nested(bundles, tmp_path_factory):
    """Raspberry Pi 5 bundles of the tiny checkpoint: nested 8-bit with float32 and with int8 (``auto``:
    the sdot nested GEMV) activations, and the fixed int8 ``uniform:8`` bundle."""
    from moec import api
    from tests.runtime.nested_fixtures import GS
    ckpt, root = bundles["host"].parent / "ckpt", tmp_path_factory.mktemp("pi5-nested")
    out = {}
    for name, nested, acts in (("nested_f32", 8, "float32"), ("nested_i8", 8, "auto"), ("fixed_i8", None, "auto")):
        out[name] = api.compile_bundle(api.CompileConfig(ckpt, root / name, "raspberry-pi-5", "uniform:8", group_size=GS,
                                                         method="rtn", nested=nested, activations=acts))
    return ckpt, out


def test_nested_aarch64_bundle_switches_plans_on_the_device(device, pi5_nested):
    """A nested raspberry-pi-5 bundle (float32 activations) on the emulated device: a mixed 2/3/4/8 plan set
    over RPC gives the greedy tokens of the torch model with the derived weights (the prompt through the
    nested prefill: its grouped GEMMs on NEON); a bad plan is refused and the plan stays."""
    from moec.runtime.session import open_remote_bundle
    from tests.runtime.nested_fixtures import derived_model, mixed_plan
    ckpt, pi5 = pi5_nested
    from moec.models.checkpoint import load_checkpoint
    plan = mixed_plan(load_checkpoint(ckpt).cfg)
    with open_remote_bundle(pi5["nested_f32"], str(device.tracker_address), KEY, timeout=60) as remote:
        prompt = remote.tokenizer.encode(PROMPT).ids
        assert remote.has_prefill and remote._holder is not None  # weights and caches held on the device
        remote.set_plan(plan)
        with pytest.raises(MoecError, match="cannot be served"):
            remote.set_plan("uniform:16")
        got, _ = remote.generate(prompt, 6)
        cfg = load_checkpoint(ckpt).cfg  # the resident decode returns the routed ids beside the logits
        assert remote.last_routed.shape == (len(cfg.moe_layers), cfg.top_k)
    assert got == derived_model(ckpt, plan).generate_greedy(prompt, 6)


def test_int8_nested_aarch64_bundle_on_the_device(device, pi5_nested):
    """The nested raspberry-pi-5 bundle compiled with the default activations runs the sdot nested GEMV: at
    the stored width its decode logits equal the fixed int8 bundle's bit for bit; switched to the mixed
    2/3/4/8 plan mid-generation and back, its greedy tokens equal the float32-activation nested bundle's."""
    from moec.runtime.session import open_remote_bundle
    from moec.models.checkpoint import load_checkpoint
    from tests.runtime.nested_fixtures import mixed_plan
    ckpt, pi5 = pi5_nested
    assert json.loads((pi5["nested_i8"] / "manifest.json").read_text())["activations"] == "int8"
    plan = mixed_plan(load_checkpoint(ckpt).cfg)
    addr = str(device.tracker_address)
    runs = {}
    for name in ("fixed_i8", "nested_i8", "nested_f32"):
        with open_remote_bundle(pi5[name], addr, KEY, timeout=60) as remote:
            prompt = remote.tokenizer.encode(PROMPT).ids
            logits = [remote.step(t) for t in prompt]
            tokens = []
            for i in range(8 if name != "fixed_i8" else 2):
                if i == 2 and name != "fixed_i8":
                    remote.set_plan(plan)
                if i == 6:
                    remote.set_plan("uniform:8")
                tokens.append(int(np.argmax(logits[-1])))
                logits.append(remote.step(tokens[-1]))
            runs[name] = tokens, logits
    fixed, nested = runs["fixed_i8"], runs["nested_i8"]
    for i in range(len(fixed[1])):  # the prompt and 2 tokens at uniform 8
        assert np.array_equal(nested[1][i], fixed[1][i])
    assert nested[0] == runs["nested_f32"][0]
    assert not np.array_equal(nested[1][-1], runs["nested_f32"][1][-1])  # int8 activations, not float32
