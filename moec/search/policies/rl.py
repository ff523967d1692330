"""RL policy: REINFORCE over per-expert features that proposes whole plans, rewarded by -cost,
with hardware in the loop (every K episodes the best plan — or, once that is measured, the episode's
best sample — is measured on the device and corrects the estimator).

Policy: for expert ``i`` the logits over bit-widths are ``φ_i · W + θ_i`` — a linear map of
the expert's features ``φ_i`` (frequency, contribution, weighted sensitivity per bit-width,
layer position, bytes per bit-width) plus a per-expert residual ``θ_i``. Each episode samples
``batch`` plans, repairs each to the memory budget (lowest added additive cost per byte), scores
them with the true (possibly non-additive, possibly measurement-corrected) cost, and takes an
Adam step on the batch-normalised REINFORCE gradient with an entropy bonus. The best plan seen
is finally polished by local search on the same cost.

State (parameters, Adam moments, RNG state, best plan, measurements) is written atomically to
``ctx.state_path`` every ``checkpoint_every`` episodes and after every measurement, so a killed
search resumes and finishes with the same plan as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moec.core.errors import MoecError
from moec.core.io import atomic_write_json
from moec.search.estimator import CorrectedEstimator
from moec.search.policies.base import SearchContext, improve, repair

log = logging.getLogger("moec")

STATE_VERSION = 1
LR = 0.1
ENTROPY = 0.01
BETAS = (0.9, 0.999)


def features(ctx: SearchContext) -> np.ndarray:
    """Standardised per-expert features [n, d] (a constant column first)."""
    p, c = ctx.problem, ctx.cost
    cols = [p.frequency, p.contribution, p.layer_index / max(len(p.layers) - 1, 1)]
    cols += list((c.w[:, None] * p.loss / c.refs["loss"]).T)
    cols += list((p.nbytes / p.nbytes.max()).T)
    x = np.stack(cols, axis=1).astype(float)
    sd = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    return np.concatenate([np.ones((p.n, 1)), x], axis=1)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class RLPolicy:
    name = "rl"
    iterative = True

    # -- state ---------------------------------------------------------------------
    def _fresh(self, ctx: SearchContext, d: int) -> dict:
        p = ctx.problem
        return {"episode": 0, "W": np.zeros((d, p.m)), "theta": np.zeros((p.n, p.m)),
                "m": [np.zeros((d, p.m)), np.zeros((p.n, p.m))], "v": [np.zeros((d, p.m)), np.zeros((p.n, p.m))],
                "t": 0, "rng": np.random.default_rng(ctx.seed).bit_generator.state,
                "best": None, "best_cost": float("inf")}

    def _signature(self, ctx: SearchContext) -> dict:
        c = ctx.cost.config
        return {"problem": ctx.problem.fingerprint(), "alpha": c.alpha, "beta": c.beta, "gamma": c.gamma,
                "weighting": c.weighting, "seed": ctx.seed, "episodes": ctx.episodes, "batch": ctx.batch,
                "measure_every": ctx.measure_every if ctx.measurer else 0, "estimator": ctx.cost.estimator.label
                if not isinstance(ctx.cost.estimator, CorrectedEstimator) else ctx.cost.estimator.base.label}

    def _save(self, ctx: SearchContext, s: dict) -> None:
        if not ctx.state_path:
            return
        est = ctx.cost.estimator
        blob = {"version": STATE_VERSION, "signature": self._signature(ctx), "episode": s["episode"],
                "W": s["W"].tolist(), "theta": s["theta"].tolist(), "m": [a.tolist() for a in s["m"]],
                "v": [a.tolist() for a in s["v"]], "t": s["t"], "rng": s["rng"],
                "best": None if s["best"] is None else [int(a) for a in s["best"]], "best_cost": s["best_cost"],
                "refs": ctx.cost.refs, "evaluations": ctx.cost.evaluations,
                "corrections": est.state() if isinstance(est, CorrectedEstimator) else [],
                "measured": [[list(k), v] for k, v in ctx.measured.items()],
                "visited": [[list(k), v] for k, v in ctx.visited.items()]}
        atomic_write_json(ctx.state_path, blob)

    def _load(self, ctx: SearchContext) -> dict | None:
        path = Path(ctx.state_path) if ctx.state_path else None
        if path is None or not path.is_file():
            return None
        try:
            blob = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MoecError(f"search state '{path}' is corrupt; delete it to start over") from None
        if blob.get("version") != STATE_VERSION:
            raise MoecError(f"search state '{path}' has version {blob.get('version')}; expected {STATE_VERSION}")
        if blob["signature"] != self._signature(ctx):
            diff = sorted(k for k in blob["signature"] if blob["signature"][k] != self._signature(ctx).get(k))
            raise MoecError(f"search state '{path}' belongs to a different search (differs in: "
                            f"{', '.join(diff)}); delete it or pass another state path")
        est = ctx.cost.estimator
        if isinstance(est, CorrectedEstimator):
            est.load_state(blob["corrections"])
        ctx.cost.refs = {k: float(v) for k, v in blob["refs"].items()}
        ctx.cost.evaluations = int(blob["evaluations"])
        ctx.measured.update({tuple(k): v for k, v in blob["measured"]})
        ctx.visited.update({tuple(k): v for k, v in blob["visited"]})
        log.info("resuming search from '%s' at episode %d", path, blob["episode"])
        return {"episode": blob["episode"], "W": np.array(blob["W"]), "theta": np.array(blob["theta"]),
                "m": [np.array(a) for a in blob["m"]], "v": [np.array(a) for a in blob["v"]], "t": blob["t"],
                "rng": blob["rng"], "best": None if blob["best"] is None else np.array(blob["best"], dtype=np.int64),
                "best_cost": float(blob["best_cost"])}

    # -- search --------------------------------------------------------------------
    def run(self, ctx: SearchContext) -> np.ndarray:
        p = ctx.problem
        phi = features(ctx)
        s = self._load(ctx) or self._fresh(ctx, phi.shape[1])
        rng = np.random.default_rng()
        rng.bit_generator.state = s["rng"]
        coef, _, _ = ctx.cost.additive()
        bar = tqdm(total=ctx.episodes, initial=s["episode"], desc="search rl", unit="ep", disable=not ctx.progress)
        rows = np.arange(p.n)
        while s["episode"] < ctx.episodes:
            probs = _softmax(phi @ s["W"] + s["theta"])
            cum = probs.cumsum(axis=1)
            u = rng.random((ctx.batch, p.n, 1))
            sampled = np.minimum((u > cum[None]).sum(axis=2), p.m - 1)
            plans = [repair(p, coef, a) for a in sampled]
            costs = np.array([ctx.evaluate(a, "rl").total for a in plans])
            k = int(np.argmin(costs))
            if costs[k] < s["best_cost"]:
                s["best"], s["best_cost"] = plans[k].copy(), float(costs[k])
            finite = np.isfinite(costs)
            if finite.sum() > 1 and costs[finite].std() > 0:
                adv = np.where(finite, -(costs - costs[finite].mean()) / costs[finite].std(), -3.0)
                g = np.zeros_like(probs)
                for a, w in zip(plans, adv):
                    onehot = np.zeros_like(probs)
                    onehot[rows, a] = 1.0
                    g += w * (onehot - probs)
                g /= len(plans)
                logp = np.log(np.maximum(probs, 1e-12))
                ent = probs * (logp + (probs * -logp).sum(axis=1, keepdims=True))  # d entropy / d logits
                g -= ENTROPY * ent
                self._adam(s, [phi.T @ g, g])
            s["episode"] += 1
            s["rng"] = rng.bit_generator.state
            measured = False
            if ctx.measurer is not None and s["episode"] % ctx.measure_every == 0 and s["best"] is not None:
                # the best plan; once it is measured, this episode's best sample instead, so the
                # correction sees distinct plans and can separate the model's parts
                pick = s["best"] if tuple(int(x) for x in s["best"]) not in ctx.measured else plans[k]
                measured = ctx.measure(pick) is not None
                s["best_cost"] = ctx.evaluate(s["best"], "rl").total  # rescored under the corrected estimator
                coef, _, _ = ctx.cost.additive()
            if measured or s["episode"] % ctx.checkpoint_every == 0 or s["episode"] == ctx.episodes:
                self._save(ctx, s)
            bar.update(1)
            bar.set_postfix(best=f"{s['best_cost']:.4f}", measured=len(ctx.measured))
            if ctx.on_episode:
                ctx.on_episode(s["episode"])
        bar.close()
        if s["best"] is None:
            raise MoecError("the rl search found no plan within the budget")
        return improve(ctx, s["best"])

    def _adam(self, s: dict, grads: list[np.ndarray]) -> None:
        s["t"] += 1
        b1, b2 = BETAS
        for i, (name, g) in enumerate(zip(("W", "theta"), grads)):
            s["m"][i] = b1 * s["m"][i] + (1 - b1) * g
            s["v"][i] = b2 * s["v"][i] + (1 - b2) * g * g
            mh = s["m"][i] / (1 - b1 ** s["t"])
            vh = s["v"][i] / (1 - b2 ** s["t"])
            s[name] = s[name] + LR * mh / (np.sqrt(vh) + 1e-8)  # ascent: g is the reward gradient
