"""Readable summary of a bundle: model, target, versions, plan table and verified file hashes."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from moec.artifact.bundle import read_manifest
from moec.artifact.resident_keys import SUFFIX
from moec.core.formats import get_nested_format


def inspect_bundle(path: str | os.PathLike) -> dict:
    """The manifest of a bundle after verifying every file's sha256 (raises on mismatch)."""
    return read_manifest(Path(path), verify=True)


def _entries(manifest: dict) -> str:
    """The functions a device can call, and how an RPC session drives them."""
    entries = sorted(manifest.get("entry", {}))
    plain = [e for e in entries if not e.endswith(SUFFIX)]
    rpc = ("over RPC the weights are held on the device (resident entries)" if any(e.endswith(SUFFIX) for e in entries)
           else "over RPC every call copies the weights (compiled before the resident entries)")
    graphs = "; CUDA graphs" if manifest.get("backend", {}).get("cuda_graphs") else ""
    return f"entries: {', '.join(plain)}; {rpc}{graphs}"


def format_bundle(manifest: dict) -> str:
    cfg = manifest["model"]["config"]
    plan = manifest["plan"]
    lines = [f"bundle for {manifest['model']['architecture']} (fingerprint {manifest['model']['fingerprint']}): "
             f"{cfg['num_layers']} layers, {cfg['num_experts']} experts, top-{cfg['top_k']}",
             f"target {manifest['target']['name']} ({manifest['tvm_target']}), TVM {manifest['tvm_version']}, "
             f"moec {manifest['moec_version']}, kernels: {manifest.get('kernels', '?')}, "
             f"{manifest.get('activations', 'float32')} activations",
             f"created {manifest['created_at']} by: {manifest['created_by']}",
             _entries(manifest),
             f"weights: {manifest['weight_bytes'] / 1e6:.3f} MB under the plan "
             f"({manifest.get('stored_weight_bytes', manifest['weight_bytes']) / 1e6:.3f} MB stored)", ""]
    experts = plan["experts"]
    e_count = cfg["num_experts"]
    lines.append("layer  " + " ".join(f"e{e:<3d}" for e in range(e_count)))
    for layer in sorted(experts, key=int):
        lines.append(f"{int(layer):>5}  " + " ".join(f"{experts[layer][str(e)]:<4d}" for e in range(e_count)))
    hist = Counter(b for row in experts.values() for b in row.values())
    lines.append("expert bits: " + ", ".join(f"{b}-bit × {n}" for b, n in sorted(hist.items())))
    lines.append(f"other tensors: {plan.get('tensors', {})}; group size {plan['group_size']}, method {plan['method']}")
    if "nested" in manifest:
        storage = manifest["nested"]["storage_bits"]
        derived = get_nested_format(storage).derived_bits
        lines.append(f"nested: routed experts stored once at {storage} bits, each served at "
                     f"{'/'.join(map(str, derived))} bits chosen at run time; the table above is the plan at load")
    lines.append("")
    sig = ("signature verified" if manifest.get("_signature_checked") else
           "signed, signature not checked (--trust PUBKEY)" if manifest.get("_signed") else "unsigned")
    lines.append(f"files (sha256 verified, nothing unlisted; {sig}):")
    for name, entry in manifest["files"].items():
        lines.append(f"  {name:<16} {entry['bytes']:>12,} B  {entry['sha256'][:16]}…")
    return "\n".join(lines)
