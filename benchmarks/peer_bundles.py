"""moec's side of the llama.cpp peer benchmark: the bundles it times, kept in ``--work`` and rebuilt when stale.

A bundle in the work directory is reused only if this moec reads its manifest (schema and format
version: a bundle from an older bundle format is refused by ``read_manifest`` and rebuilt, not
crashed on) and it was built with the wanted activations and plan (:func:`bundle_is_current`).
Nothing here needs llama.cpp; ``tests/test_peer_bundles.py`` covers the staleness check.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from moec.core.errors import MoecError

#: plan fields compared between a reused bundle's manifest and the plan it should hold
PLAN_KEYS = ("experts", "tensors", "group_size", "method")
#: the label of :func:`mixed_plan` in result tables
MIXED = "mixed"


def bundle_is_current(bundle: Path, activations: str, plan: dict | None = None) -> bool:
    """True when ``bundle`` exists, this moec accepts its manifest, and it holds ``activations`` and
    (when given, as ``BitPlan.to_json()``) ``plan``'s experts, tensors, group size and method."""
    from moec.artifact.bundle import read_manifest

    if not (bundle / "manifest.json").is_file():
        return False
    try:
        manifest = read_manifest(bundle, verify=False)
    except MoecError:  # another bundle format version, or not a moec bundle
        return False
    if manifest.get("activations", "float32") != activations:
        return False
    return plan is None or all(manifest["plan"].get(k) == plan.get(k) for k in PLAN_KEYS)


def moec_compile(ckpt: Path, plan: str, out: Path, activations: str, quant_cache: Path | None = None,
                 plan_json: dict | None = None) -> Path:
    """``moec compile CKPT --plan PLAN --activations A`` into ``out`` unless a current bundle is there.

    ``plan`` is ``uniform:B`` or a plan JSON file (``plan_json`` its content, compared with the
    existing bundle's). ``quant_cache`` shares quantized weights between the bundles of one
    checkpoint (the same plan at both activation modes quantizes once).
    """
    if bundle_is_current(out, activations, plan_json):
        return out
    cmd = [sys.executable, "-m", "moec", "compile", str(ckpt), "--plan", plan, "--method", "mse",
           "--target", "host", "--activations", activations, "--out", str(out), "--force"]
    if quant_cache is not None:
        cmd += ["--quant-cache", str(quant_cache)]
    print(f"compiling {out.name}: {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True)
    return out


def mixed_plan(cfg):
    """The documented mixed plan: routed experts alternate 4 bits (even ids) and 2 bits (odd ids);
    attention, embedding and LM head 4 bits; router float16; group 64, ``mse``.

    On the OLMoE shapes it holds 41 % of uniform:8's bytes. A decode step reads the routed
    experts, the attention weights and the LM head (the embedding is one gathered row), so the
    non-expert weights are at 4 bits too: at 8 bits they alone are 46 % of uniform:8's bytes read
    per token, which caps a plan that only narrows the experts at ~1.5x uniform:8.
    """
    from moec.core.plan import BitPlan

    experts = {layer: {e: 4 if e % 2 == 0 else 2 for e in range(cfg.num_experts)} for layer in cfg.moe_layers}
    return BitPlan(experts, {"router": 16, "re:.*": 4}, 64, "mse", cfg.fingerprint(),
                   {"policy": "peer-mixed-2/4, rest 4"})


def write_mixed_plan(ckpt: Path, out: Path) -> tuple[Path, dict, float]:
    """Write :func:`mixed_plan` of ``ckpt`` to ``out`` (JSON); returns (path, its JSON, bytes / uniform:8 bytes)."""
    from moec.core.plan import uniform_plan
    from moec.models.checkpoint import load_config
    from moec.quant.accounting import plan_memory, shape_model

    cfg = load_config(ckpt)
    plan = mixed_plan(cfg)
    model = shape_model(cfg)
    share = plan_memory(model, plan).total / plan_memory(model, uniform_plan(cfg, 8)).total
    data = plan.to_json()
    if not out.exists() or json.loads(out.read_text()) != data:
        plan.save(out)
    return out, data, share


def bundle_file_bytes(bundle: Path) -> int:
    """Bytes of every file of the bundle (library, weights, index, tokenizer, manifest)."""
    return sum(p.stat().st_size for p in bundle.iterdir() if p.is_file())


def build_bundles(ckpt: Path, out: Path, bits: list[int], acts: list[str],
                  mixed: bool, quant_cache: bool = True) -> tuple[dict[tuple[str, str], Path], float]:
    """``{(plan label, activations): bundle}`` and the mixed plan's share of uniform:8's bytes (``quant_cache``:
    share quantized weights between the bundles through ``out/quant-cache``)."""
    cache = out / "quant-cache" if quant_cache else None
    bundles = {}
    for b in bits:
        for act in acts:
            bundles[(f"uniform:{b}", act)] = moec_compile(ckpt, f"uniform:{b}", out / f"moec-u{b}-{act}", act, cache)
    share = float("nan")
    if mixed:
        path, plan_json, share = write_mixed_plan(ckpt, out / "mixed-plan.json")
        for act in acts:
            bundles[(MIXED, act)] = moec_compile(ckpt, str(path), out / f"moec-mixed-{act}", act, cache, plan_json)
    return bundles, share
