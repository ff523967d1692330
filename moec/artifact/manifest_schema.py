"""Strict schema of a bundle's manifest.json: exact types, no unknown keys, safe file names."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from moec.core.errors import MoecError

FORMAT = "moec-bundle"
# 2: weights.bin + weights.json replace weights.npz; 3: decode/prefill take a position and fixed-capacity KV
# caches written in place (2 returned a new, one-token-longer cache per call)
FORMAT_VERSION = 3
_OLD_VERSIONS = {1: " (weights.npz)", 2: " (a KV cache that grows by a copy per token)"}
RESERVED = ("manifest.json", "manifest.sig")
_SHA = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9._\-]+")

# key -> (types, required); JSON types only: a bool is never an int here
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "format": ((str,), True), "format_version": ((int,), True), "model": ((dict,), True),
    "plan": ((dict,), True), "target": ((dict,), True), "tvm_target": ((str,), True),
    "tvm_version": ((str,), True), "moec_version": ((str,), True), "created_by": ((str,), True),
    "created_at": ((str,), True), "entry": ((dict,), True), "params": ((list,), True),
    "eos_token_id": ((int, type(None)), True), "weight_bytes": ((int,), True),
    "stored_weight_bytes": ((int,), False), "kernels": ((str,), False), "activations": ((str,), False),
    "cuda": ((dict,), False), "recipe": ((dict,), False), "source": ((str,), False), "files": ((dict,), True),
    "backend": ((dict,), False), "onnx": ((str,), False), "streamed": ((bool,), False),
    "nested": ((dict,), False), "plan_front": ((list,), False),
}


def _is(value, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def check_name(name, where: str) -> str:
    """A bundle-relative file name: POSIX, relative, no ``..``/``.``/empty parts, plain characters."""
    if not isinstance(name, str) or not name or len(name) > 200:
        raise MoecError(f"{where}: bad file name {str(name)[:60]!r}")
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") or not _NAME.fullmatch(p) for p in parts):
        raise MoecError(f"{where}: file name {name[:60]!r} leaves the bundle or is not a plain relative path; "
                        "refusing to load")
    if name in RESERVED:
        raise MoecError(f"{where}: '{name}' cannot be listed as a bundle file")
    return str(PurePosixPath(name))


def check_manifest(m, where: str) -> None:
    """Raise MoecError (one line, naming the field) unless ``m`` is a well-formed version-1 manifest."""
    if not isinstance(m, dict):
        raise MoecError(f"{where}: manifest.json is not a JSON object")
    if m.get("format") != FORMAT:
        raise MoecError(f"{where} is not a moec bundle (format {str(m.get('format'))[:40]!r})")
    if m.get("format_version") != FORMAT_VERSION or isinstance(m.get("format_version"), bool):
        version = m.get("format_version")
        old = _OLD_VERSIONS.get(version, "") if type(version) is int else ""
        raise MoecError(f"{where}: bundle format version {str(m.get('format_version'))[:20]}{old} is not supported "
                        f"(this moec reads {FORMAT_VERSION}); rebuild it with moec compile or moec build")
    unknown = sorted(set(m) - set(_FIELDS))
    if unknown:
        raise MoecError(f"{where}: manifest has unknown field '{unknown[0][:40]}'")
    for key, (types, required) in _FIELDS.items():
        if key not in m:
            if required:
                raise MoecError(f"{where}: manifest lacks field '{key}'")
            continue
        if not _is(m[key], types):
            raise MoecError(f"{where}: manifest field '{key}' must be {' or '.join(t.__name__ for t in types)}")
    for key in ("weight_bytes", "stored_weight_bytes"):
        if key in m and m[key] < 0:
            raise MoecError(f"{where}: manifest field '{key}' is negative")
    _check_files(m["files"], where)
    _check_model(m, where)
    entry = m["entry"]
    if not entry or not all(isinstance(k, str) and isinstance(v, str) for k, v in entry.items()):
        raise MoecError(f"{where}: manifest 'entry' must map entry names to function names")
    if "decode" not in entry:
        raise MoecError(f"{where}: manifest 'entry' has no 'decode' function")
    if not m["params"] or not all(isinstance(p, str) for p in m["params"]) or len(set(m["params"])) != len(m["params"]):
        raise MoecError(f"{where}: manifest 'params' must be a non-empty list of distinct names")
    tgt = m["target"]
    for key in ("name", "family"):
        if not isinstance(tgt.get(key), str):
            raise MoecError(f"{where}: manifest 'target.{key}' must be a string")
    if "rpc_key" in tgt and not isinstance(tgt["rpc_key"], (str, type(None))):
        raise MoecError(f"{where}: manifest 'target.rpc_key' must be a string")
    if "tokenizer.json" not in m["files"] and m["eos_token_id"] is not None:
        raise MoecError(f"{where}: manifest has an eos_token_id but no tokenizer.json")


def _check_files(files: dict, where: str) -> None:
    if not files:
        raise MoecError(f"{where}: manifest lists no files")
    if "lib.so" not in files:
        raise MoecError(f"{where}: manifest does not list lib.so")
    for name, entry in files.items():
        check_name(name, where)
        if not isinstance(entry, dict) or set(entry) != {"sha256", "bytes"}:
            raise MoecError(f"{where}: manifest entry for '{name[:60]}' must be {{\"sha256\", \"bytes\"}}")
        if not isinstance(entry["sha256"], str) or not _SHA.fullmatch(entry["sha256"]):
            raise MoecError(f"{where}: manifest entry for '{name}' has a malformed sha256")
        if not _is(entry["bytes"], (int,)) or isinstance(entry["bytes"], bool) or entry["bytes"] < 0:
            raise MoecError(f"{where}: manifest entry for '{name}' has a malformed byte count")


def _check_model(m: dict, where: str) -> None:
    from moec.core.config import config_from_dict
    from moec.core.plan import BitPlan

    model = m["model"]
    if set(model) != {"architecture", "fingerprint", "config"}:
        raise MoecError(f"{where}: manifest 'model' must have exactly architecture, fingerprint, config")
    if not isinstance(model["config"], dict) or not isinstance(model["fingerprint"], str):
        raise MoecError(f"{where}: manifest 'model' is malformed")
    cfg = config_from_dict(model["config"], f"{where}: model config")
    if cfg.fingerprint() != model["fingerprint"]:
        raise MoecError(f"{where}: model fingerprint does not match its config")
    plan = BitPlan.from_json(m["plan"], source=f"{where}: plan").validate(cfg)
    if "nested" in m:
        _check_nested(m, cfg, plan, where)
    if "plan_front" in m:
        _check_front(m, cfg, where)


_FRONT_KEYS = {"experts", "expert_bytes", "bytes_per_token", "latency_s", "energy_j", "mean_bits"}


def _check_front(m: dict, cfg, where: str) -> None:
    """``plan_front`` (nested bundles): entries of every MoE layer's widths, servable, with numeric costs."""
    from moec.core.formats import get_nested_format

    if "nested" not in m:
        raise MoecError(f"{where}: manifest 'plan_front' needs a nested bundle")
    served = get_nested_format(m["nested"]["storage_bits"]).derived_bits
    layers = {str(layer) for layer in cfg.moe_layers}
    for i, entry in enumerate(m["plan_front"]):
        if not isinstance(entry, dict) or set(entry) != _FRONT_KEYS or any(
                isinstance(entry[k], bool) or not isinstance(entry[k], (int, float)) or entry[k] < 0
                for k in _FRONT_KEYS - {"experts"}):
            raise MoecError(f"{where}: manifest 'plan_front[{i}]' must hold {', '.join(sorted(_FRONT_KEYS))} "
                            f"(non-negative numbers but 'experts')")
        experts = entry["experts"]
        if not isinstance(experts, dict) or set(experts) != layers or any(
                not isinstance(row, list) or len(row) != cfg.num_experts or any(
                    isinstance(b, bool) or b not in served for b in row) for row in experts.values()):
            raise MoecError(f"{where}: manifest 'plan_front[{i}].experts' must give every MoE layer "
                            f"{cfg.num_experts} widths among {', '.join(map(str, served))}")


def _check_nested(m: dict, cfg, plan, where: str) -> None:
    """A nested bundle: known storage, its plan servable from it, one width table per MoE layer in params."""
    from moec.core.run_plan import plan_widths, prec_table_name

    nested = m["nested"]
    if set(nested) != {"storage_bits"} or not _is(nested["storage_bits"], (int,)):
        raise MoecError(f"{where}: manifest 'nested' must be {{\"storage_bits\": int}}")
    plan_widths(cfg, plan, nested["storage_bits"])
    missing = [prec_table_name(layer) for layer in cfg.moe_layers if prec_table_name(layer) not in m["params"]]
    if missing:
        raise MoecError(f"{where}: nested bundle lacks the run-time table '{missing[0]}'")
