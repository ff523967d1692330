"""Seeded mutation fuzzing of moec's four input parsers: plans, recipes, bundle manifests, configs.

Every mutated document must give either a clean one-line ``MoecError`` or a correct result
(a plan that re-serializes to itself, a recipe, a verified bundle, a config); anything else
(another exception, a multi-line message, a traceback, a run over the time limit) is counted
as a failure. Usage::

    python benchmarks/fuzz.py [--per-parser 300] [--seed 0]

The test suite runs a smaller share of the same mutations (``tests/test_fuzz_inputs.py``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from moec.core.errors import MoecError  # noqa: E402
from moec.artifact.manifest_schema import FORMAT_VERSION  # noqa: E402
from moec.core.config import MoEConfig  # noqa: E402

LIMIT_S = 5.0
PARSERS = ("plan", "recipe", "manifest", "config")

_WEIRD = [None, True, False, 0, -1, -5, 1.5, 256.5, 1e308, "64", "\uff11", "", "x" * 300, "../../etc/passwd",
          "/etc/passwd", "re:(", "re:(a+)+$", [], {}, [1, [2, [3]]], {"a": {"b": {}}}, 10 ** 40, "NaN",
          "01", " 1", "1e3", 2 ** 63, -2 ** 63]


def tiny_cfg() -> MoEConfig:
    return MoEConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, num_experts=2,
                     top_k=1, expert_intermediate=16)


def base_plan(cfg: MoEConfig) -> dict:
    from moec.core.plan import uniform_plan
    p = uniform_plan(cfg, 4, group_size=16).to_json()
    p["tensors"] = {"attention": 8, "lm_head": 4, "re:layers\\.0\\..*": 8, "re:.*": 4}
    p["provenance"] = {"policy": "fuzz", "seed": 0}
    return p


def base_recipe() -> dict:
    return {"name": "fuzz", "model": "ckpt", "data": {"calibration": "d.txt", "max_tokens": 512, "seq_len": 64,
                                                      "batch": 2},
            "target": "host", "budget_mb": 3.5, "policy": "greedy", "alpha": 1.0, "beta": 0.5, "gamma": 0.05,
            "tensor_bits": {"router": 16, "re:.*": 4}, "group_size": 32, "method": "rtn", "episodes": 10, "seed": 1}


def base_manifest(cfg: MoEConfig, files: dict[str, bytes]) -> dict:
    from moec.core.plan import uniform_plan
    return {"format": "moec-bundle", "format_version": FORMAT_VERSION,
            "model": {"architecture": cfg.architecture, "fingerprint": cfg.fingerprint(), "config": cfg.to_dict()},
            "plan": uniform_plan(cfg, 4, group_size=16).to_json(),
            "target": {"name": "host", "family": "cpu", "rpc_key": "host"}, "tvm_target": "llvm",
            "tvm_version": "0", "moec_version": "0", "created_by": "fuzz", "created_at": "2026-01-01T00:00:00Z",
            "entry": {"decode": "decode", "prefill": "prefill"}, "params": ["p0", "p1"], "eos_token_id": None,
            "weight_bytes": 4,
            "files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for n, b in files.items()}}


def base_config(cfg: MoEConfig) -> dict:
    from moec.models.registry import get_adapter
    return get_adapter(cfg.architecture).to_hf_config(cfg)


# -- mutations -------------------------------------------------------------------------
def _nodes(obj, path=()):
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _nodes(v, path + (i,))


def _set(obj, path, value):
    if not path:
        return value
    cur = obj
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return obj


def mutate_tree(rng: random.Random, doc):
    """A structural mutation of ``doc`` (a deep copy)."""
    doc = copy.deepcopy(doc)
    path, node = rng.choice(list(_nodes(doc)))
    op = rng.randrange(7)
    if op == 0 and path:  # delete
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        del parent[path[-1]]
        return doc
    if op == 1 and isinstance(node, dict):  # unknown or odd key
        node[rng.choice(["extra", "01", "\uff11", "../x", "", "re:(", "files"])] = rng.choice(_WEIRD)
        return doc
    if op == 2:  # deep nesting
        deep = rng.choice([1, 2])
        for _ in range(rng.choice([5, 40, 300])):
            deep = [deep]
        return _set(doc, path, deep)
    if op == 3 and isinstance(node, (int, float)) and not isinstance(node, bool):
        return _set(doc, path, rng.choice([node * -1, node + 0.5, str(node), node * 10 ** 30, 0, bool(node)]))
    if op == 4 and isinstance(node, str):
        return _set(doc, path, rng.choice([node + "\x00", node[::-1], "../" + node, "/" + node, node * 50, ""]))
    return _set(doc, path, copy.deepcopy(rng.choice(_WEIRD)))


def mutate_text(rng: random.Random, text: str) -> str:
    """A textual mutation: truncation, byte noise, duplicated keys, special numbers."""
    op = rng.randrange(6)
    if op == 0:
        return text[: rng.randrange(len(text) + 1)]
    if op == 1:
        i = rng.randrange(len(text) + 1)
        return text[:i] + rng.choice(["\x00", "\\", '"', "{", "]", ":", "\uffff", "NaN", "Infinity", "-"]) + text[i:]
    if op == 2:
        return text.replace("{", '{"version": 1, ', 1) if rng.random() < 0.5 else text.replace(
            '"', '"dup": 0, "dup": 1, "', 1)
    if op == 3:
        return text.replace("64", "1e999", 1).replace("16", "9" * 5000, 1)
    if op == 4:
        return "[" * rng.choice([50, 5000, 100000]) + text
    return text.replace("1", "\uff11", 1)


def mutations(rng: random.Random, base, to_text, n: int):
    for _ in range(n):
        if rng.random() < 0.7:
            doc = base
            try:
                for _ in range(rng.choice([1, 1, 2, 3])):
                    doc = mutate_tree(rng, doc)
                yield to_text(doc)
            except (ValueError, RecursionError, yaml.YAMLError):  # the fuzzer's own limits, not moec's
                yield mutate_text(rng, to_text(base))
        else:
            yield mutate_text(rng, to_text(base))


# -- the parsers under test --------------------------------------------------------------
def _json(doc) -> str:
    return json.dumps(doc, indent=1)


def check_plan(work: Path, text: str, cfg: MoEConfig) -> str:
    from moec.core.plan import BitPlan, resolve_plan
    f = work / "plan.json"
    f.write_text(text, errors="surrogatepass")
    plan = resolve_plan(f, cfg)
    again = BitPlan.from_json(json.loads(json.dumps(plan.to_json()))).validate(cfg)
    assert again.to_json() == plan.to_json(), "plan does not round-trip"
    return "ok"


def check_recipe(work: Path, text: str, cfg: MoEConfig) -> str:
    from moec.pipeline.recipe import load_recipe
    f = work / "recipe.yaml"
    f.write_text(text, errors="surrogatepass")
    r = load_recipe(f)
    assert isinstance(r.group_size, int) and not isinstance(r.group_size, bool) and r.group_size > 0
    return "ok"


def check_manifest(work: Path, text: str, cfg: MoEConfig) -> str:
    from moec.artifact.bundle import verify_bundle
    b = work / "bundle"
    (b / "manifest.json").write_text(text, errors="surrogatepass")
    m = verify_bundle(b)
    assert set(m["files"]) == {"lib.so", "weights.bin"}, "verified a bundle whose file list changed"
    return "ok"


def check_config(work: Path, text: str, cfg: MoEConfig) -> str:
    from moec.models.checkpoint import load_config
    (work / "ckpt").mkdir(exist_ok=True)
    (work / "ckpt" / "config.json").write_text(text, errors="surrogatepass")
    c = load_config(work / "ckpt")
    assert c.hidden_size > 0 and c.num_experts >= c.top_k >= 1
    return "ok"


CHECKS = {"plan": check_plan, "recipe": check_recipe, "manifest": check_manifest, "config": check_config}


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def run_fuzz(per_parser: int, seed: int = 0, parsers=PARSERS) -> dict:
    """Outcomes per parser: ok, clean (one-line MoecError), internal, multiline, hang; plus examples."""
    cfg = tiny_cfg()
    rng = random.Random(seed)
    files = {"lib.so": b"\x7fELF not a library", "weights.bin": b"\0" * 16}
    bases = {"plan": (base_plan(cfg), _json), "recipe": (base_recipe(), yaml.safe_dump),
             "manifest": (base_manifest(cfg, files), _json), "config": (base_config(cfg), _json)}
    report: dict = {p: Counter() for p in parsers}
    report["examples"] = []
    old = signal.signal(signal.SIGALRM, _alarm)
    work = Path(tempfile.mkdtemp(prefix="moec-fuzz-"))
    try:
        (work / "bundle").mkdir()
        for name, data in files.items():
            (work / "bundle" / name).write_bytes(data)
        for parser in parsers:
            base, to_text = bases[parser]
            for text in mutations(rng, base, to_text, per_parser):
                t0 = time.monotonic()
                signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
                try:
                    outcome = CHECKS[parser](work, text, cfg)
                except MoecError as exc:
                    msg = str(exc)
                    outcome = "clean" if msg and "\n" not in msg and "Traceback" not in msg else "multiline"
                    if outcome == "multiline":
                        report["examples"].append(f"{parser}: multi-line MoecError {msg[:200]!r}")
                except _Hang:
                    outcome = "hang"
                except Exception as exc:  # noqa: BLE001 - what the fuzzer is looking for
                    outcome = "internal"
                    report["examples"].append(f"{parser}: {type(exc).__name__}: {str(exc)[:160]} <- {text[:120]!r}")
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                if time.monotonic() - t0 > LIMIT_S:
                    outcome = "hang"
                report[parser][outcome] += 1
    finally:
        signal.signal(signal.SIGALRM, old)
        shutil.rmtree(work, ignore_errors=True)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-parser", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    rep = run_fuzz(args.per_parser, args.seed)
    total = Counter()
    print(f"{'parser':<10} {'mutations':>9} {'ok':>5} {'clean':>6} {'internal':>8} {'multiline':>9} {'hang':>5}")
    for p in PARSERS:
        c = rep[p]
        total.update(c)
        print(f"{p:<10} {sum(c.values()):>9} {c['ok']:>5} {c['clean']:>6} {c['internal']:>8} {c['multiline']:>9} "
              f"{c['hang']:>5}")
    print(f"{'total':<10} {sum(total.values()):>9} {total['ok']:>5} {total['clean']:>6} {total['internal']:>8} "
          f"{total['multiline']:>9} {total['hang']:>5}   ({time.time() - t0:.1f} s, seed {args.seed})")
    for e in rep["examples"][:10]:
        print("  " + e)
    return 1 if total["internal"] or total["multiline"] or total["hang"] else 0


if __name__ == "__main__":
    sys.exit(main())
