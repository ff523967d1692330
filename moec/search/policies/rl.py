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

    def _load(self, ctx: SearchContext, d: int) -> dict | None:
        path = Path(ctx.state_path) if ctx.state_path else None
        if path is None or not path.is_file():
            return None
        try:
            blob = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise MoecError(f"search state '{path}' is corrupt; delete it to start over") from None
        if not isinstance(blob, dict):
            raise MoecError(f"search state '{path}' is corrupt (not a JSON object); delete it to start over")
        if blob.get("version") != STATE_VERSION:
            raise MoecError(f"search state '{path}' has version {str(blob.get('version'))[:20]}; "
                            f"expected {STATE_VERSION}")
        sig = blob.get("signature")
        if not isinstance(sig, dict) or sig != self._signature(ctx):
            diff = sorted(k for k in sig if sig[k] != self._signature(ctx).get(k)) if isinstance(sig, dict) else ["all"]
            raise MoecError(f"search state '{path}' belongs to a different search (differs in: "
                            f"{', '.join(map(str, diff))[:200]}); delete it or pass another state path")
        try:
            state = self._parse_state(ctx, blob, d)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as exc:
            raise MoecError(f"search state '{path}' is malformed ({type(exc).__name__}: {str(exc)[:100]}); "
                            "delete it to start over") from None
        log.info("resuming search from '%s' at episode %d", path, state["episode"])
        return state

    def _parse_state(self, ctx: SearchContext, blob: dict, d: int) -> dict:
        """The state in ``blob`` after checking every field against a fresh state's shapes and ranges."""
        p, fresh = ctx.problem, self._fresh(ctx, d)
        missing = sorted(set(fresh) - set(blob))
        if missing:
            raise KeyError(missing[0])
        episode, t = blob["episode"], blob["t"]
        for name, v in (("episode", episode), ("t", t), ("evaluations", blob["evaluations"])):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {str(v)[:20]}")
        if episode > ctx.episodes:
            raise ValueError(f"episode {episode} is beyond the search's {ctx.episodes} episodes")

        def arr(x, like):
            a = np.array(x, dtype=np.float64)
            if a.shape != like.shape or not np.isfinite(a).all():
                raise ValueError(f"an array has shape {a.shape}, expected {like.shape} (finite values)")
            return a

        out = {"episode": episode, "t": t, "W": arr(blob["W"], fresh["W"]), "theta": arr(blob["theta"], fresh["theta"]),
               "m": [arr(x, f) for x, f in zip(blob["m"], fresh["m"], strict=True)],
               "v": [arr(x, f) for x, f in zip(blob["v"], fresh["v"], strict=True)]}
        np.random.default_rng().bit_generator.state = blob["rng"]  # raises on a malformed state
        out["rng"] = blob["rng"]
        best = blob["best"]
        if best is not None:
            best = np.array(best, dtype=np.int64)
            if best.shape != (p.n,) or (best < 0).any() or (best >= p.m).any():
                raise ValueError("best is not an assignment of this problem")
        out["best"], out["best_cost"] = best, float(blob["best_cost"])
        if best is None and out["best_cost"] != float("inf"):
            raise ValueError("best_cost without a best plan")
        refs = {str(k): float(v) for k, v in dict(blob["refs"]).items()}
        measured = {tuple(int(i) for i in k): dict(v) for k, v in blob["measured"]}
        visited = {tuple(int(i) for i in k): dict(v) for k, v in blob["visited"]}
        est = ctx.cost.estimator
        if isinstance(est, CorrectedEstimator):
            est.load_state(blob["corrections"])
        ctx.cost.refs = refs
        ctx.cost.evaluations = blob["evaluations"]
        ctx.measured.update(measured)
        ctx.visited.update(visited)
        return out

    # -- search --------------------------------------------------------------------
    def run(self, ctx: SearchContext) -> np.ndarray:
        p = ctx.problem
        phi = features(ctx)
        s = self._load(ctx, phi.shape[1]) or self._fresh(ctx, phi.shape[1])
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
