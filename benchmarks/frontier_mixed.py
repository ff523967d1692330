"""The mixed stage of ``frontier.py``: per-expert widths at each llama.cpp byte budget (moec's own search).

``frontier.py``'s first stage keeps all experts at one width. This stage gives every (layer, expert)
its own width, the way ``moec search`` does, and the non-expert parts any of ``MIXED_PART_BITS``:

1. calibration: the first ``--calib-tokens`` tokens of the calibration text (``reference/data/calib.txt``,
   not the held-out text), cut into chunks of ``CTX`` and scored like the held-out text (second half);
2. part sensitivities on it: the NLL increase with one part (attention q/k/o, attention v, embeddings,
   LM head, all experts) alone at each width, the rest float;
3. per-expert sensitivities: moec's gate-weighted output-distortion proxy (``proxy_sensitivity``) of each
   expert at each width, scaled per width so that the experts' values sum to the measured NLL increase of
   all experts at that width (the proxy ranks experts; the measurement gives it NLL units);
4. for each llama.cpp point and each combination of non-expert widths that fits, the exact ILP
   (``moec.search.policies.ilp.solve_additive``) gives the experts the widths of least summed
   sensitivity in the bytes left (``packed_nbytes``, exact); the combinations are ranked by the summed
   sensitivity (non-expert parts + the ILP's experts), and the ``--mixed-top`` best are scored on the
   held-out chunks like every other plan, with the non-expert widths named in ``--mixed-parts``
   (experts again by the ILP). The experts take the widths of ``--mixed-expert-bits`` (default 4/5/6/8:
   experts the calibration text rarely routes to went to 3 bits and cost more on the held-out text).

The additive ranking is only as good as the calibration measurements: on the reference model the
LM head at 5 bits and attention q/k/o at 4 measured within the noise of 8,192 tokens on the
calibration text and cost 0.2-0.3 % on the held-out text (README, "Per-expert widths on the frontier").
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

#: Widths of each non-expert part in the mixed stage (int5/int6 have kernels on x86 and ARM, and the
#: embedding lookup dequantizes any width), and the per-expert widths.
NON_EXPERT = ("attn_qko", "attn_v", "embeddings", "lm_head")
#: (2 and 3 bits are left out: at the budgets where per-expert widths matter, 4-8 bits, they are never picked
#: by the first stage for a non-expert part, and each width costs a calibration measurement.)
MIXED_PART_BITS = {"attn_qko": (4, 5, 6, 8), "attn_v": (4, 5, 6, 8), "embeddings": (4, 5, 6, 8),
                   "lm_head": (4, 5, 6, 8)}
EXPERT_BITS = (3, 4, 5, 6, 8)


def mixed_plan(cfg, widths: dict[tuple[int, int], int], bits: dict[str, int], group, method: str):
    """The plan of ``frontier.part_plan`` for the non-expert ``bits`` with expert ``(layer, e)`` at ``widths``."""
    from frontier import part_plan

    plan = part_plan(cfg, {**bits, "experts": 16}, group, method)
    plan.experts = {l: {e: widths[(l, e)] for e in range(cfg.num_experts)} for l in cfg.moe_layers}
    plan.provenance = {"policy": "frontier mixed " + describe_mixed(widths, bits, group)}
    return plan.validate(cfg)


def expert_counts(widths: dict[tuple[int, int], int]) -> str:
    """``2×3 / 26×4 / 4×5``: how many experts at each width."""
    c = Counter(widths.values())
    return " / ".join(f"{c[b]}×{b}" for b in sorted(c))


def describe_mixed(widths, bits: dict[str, int], group) -> str:
    from frontier import group_tag

    return f"experts {expert_counts(widths)}, attn q/k/o {bits['attn_qko']} v {bits['attn_v']}, " \
           f"embed {bits['embeddings']}, head {bits['lm_head']}, {group_tag(group)}"


def calib_chunks(ckpt: Path, path: Path, n_ctx: int, tokens: int):
    """Chunks of ``n_ctx`` ids from the first ``tokens`` tokens of ``path`` (special tokens as text)."""
    from moec.models.tokenizer import load_tokenizer
    from moec.profile.data import context_chunks, read_text

    tok = load_tokenizer(ckpt)
    tok.encode_special_tokens = True
    return context_chunks(tok.encode(read_text(path)).ids[:tokens], n_ctx)


def sensitivities(model, chunks, n_ctx: int, group, method: str, cache, tag: str):
    """(part sensitivities ``{(part, bits): nats}``, items ``[(layer, e)]``, expert loss ``[n, len(EXPERT_BITS)]``)."""
    from frontier import group_tag, part_plan
    from peer_common import moec_perplexity
    from moec.profile.sensitivity import proxy_sensitivity

    cfg = model.cfg
    g = group_tag(group)
    base = cache.get(f"{tag} FP32", lambda: moec_perplexity(model, None, chunks, n_ctx))
    part = {}
    for p, widths in list(MIXED_PART_BITS.items()) + [("experts", EXPERT_BITS)]:
        for b in widths:
            plan = part_plan(cfg, {p: b}, group, method)
            ppl = cache.get(f"{tag} {method} {g} {p}:{b}", lambda plan=plan: moec_perplexity(model, plan, chunks, n_ctx))
            part[(p, b)] = math.log(ppl / base)
    key = f"{tag} {method} {g} expert proxy {','.join(map(str, EXPERT_BITS))}"
    if key not in cache.data:
        proxy = proxy_sensitivity(model, chunks, list(EXPERT_BITS), group[0], method)
        cache.data[key] = {str(l): v.tolist() for l, v in proxy.items()}
        cache.path.write_text(json.dumps(cache.data, indent=1))
    proxy = {int(l): np.asarray(v) for l, v in cache.data[key].items()}
    items = [(l, e) for l in cfg.moe_layers for e in range(cfg.num_experts)]
    raw = np.stack([proxy[l][e] for l, e in items])                      # [n, m]
    # proxy -> nats: each width's column sums to the measured increase of all experts at that width
    # (floored at 0: a negative measured increase is noise, and the ILP needs losses that fall with width)
    scale = np.array([max(part[("experts", b)], 0.0) for b in EXPERT_BITS]) / np.maximum(raw.sum(0), 1e-30)
    loss = raw * scale
    loss = np.maximum.accumulate(loss[:, ::-1], axis=1)[:, ::-1]     # never more loss at a wider width
    return part, items, loss


def expert_bytes(cfg, group) -> np.ndarray:
    """Packed bytes of one expert (all its projections) at each of ``EXPERT_BITS`` (exact)."""
    from moec.core.inventory import expert_shapes
    from moec.quant.pack import packed_nbytes

    shapes = expert_shapes(cfg).values()
    return np.array([sum(packed_nbytes(n, k, b, group[0], group[1])["total"] for n, k in shapes) for b in EXPERT_BITS])


def fixed_bytes(model, group, method: str) -> dict[tuple[int, ...], int]:
    """Bytes of everything but the routed experts for each combination of ``MIXED_PART_BITS`` (exact)."""
    from moec.quant.accounting import plan_memory
    from frontier import part_plan

    cfg = model.cfg
    n = len(cfg.moe_layers) * cfg.num_experts
    low = n * int(expert_bytes(cfg, group)[0])
    return {w: plan_memory(model, part_plan(cfg, {**dict(zip(NON_EXPERT, w)), "experts": EXPERT_BITS[0]},
                                            group, method)).total - low
            for w in itertools.product(*(MIXED_PART_BITS[p] for p in NON_EXPERT))}


def candidates(model, budget: int, part: dict, items, loss, group, fixed: dict, top: int,
               allowed: tuple[int, ...] = EXPERT_BITS):
    """The ``top`` best-ranked (rank, bytes, non-expert bits, expert widths) that fit ``budget``, each
    expert at one of ``allowed`` (a subset of ``EXPERT_BITS``)."""
    from moec.search.policies.ilp import solve_additive

    cols = [EXPERT_BITS.index(b) for b in allowed]
    per = expert_bytes(model.cfg, group)[cols]
    nbytes = np.tile(per, (len(items), 1))
    loss = loss[:, cols]
    out = []
    for widths, fixed_b in fixed.items():
        bits = dict(zip(NON_EXPERT, widths))
        cap = budget - fixed_b
        if cap < len(items) * per[0]:
            continue
        a = solve_additive(loss, nbytes, cap)
        rank = sum(part[(p, bits[p])] for p in NON_EXPERT) + float(loss[np.arange(len(items)), a].sum())
        out.append((rank, fixed_b + int(nbytes[np.arange(len(items)), a].sum()), bits,
                    {it: allowed[j] for it, j in zip(items, a)}))
    out.sort(key=lambda c: c[0])
    return out[:top]
