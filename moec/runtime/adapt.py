"""Run-time plan policies of nested bundles: a routed-expert memory budget met by demoting the coldest experts.

``memory_plan`` starts from every expert at the storage's widest width and evicts experts to the
narrowest width, coldest first (lowest calibration routing frequency; the bundle's
``profile.json`` when it was compiled with ``--data``, else every expert equally hot and layer /
expert order decides), until the bytes the plan reads fit the budget; the last expert demoted
then gets the widest width that still fits. The budget counts routed-expert bytes (planes,
scales, zeros of every expert once); other weights are fixed at compile time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moec.core.config import MoEConfig
from moec.core.errors import MoecError
from moec.core.formats import get_nested_format
from moec.core.io import read_json
from moec.core.plan import BitPlan
from moec.runtime.plan_switch import width_bytes


def memory_plan(cfg: MoEConfig, base: BitPlan, storage_bits: int, per_expert: dict[str, dict[str, int]],
                budget_bytes: float, frequencies: dict[int, np.ndarray] | None = None) -> BitPlan:
    """The plan (``base`` with new expert widths) whose routed experts read at most ``budget_bytes``.

    ``per_expert`` is what ``BundleSession`` keeps: one expert's bytes of each nested array per entry.
    Raises a one-line :class:`MoecError` when even every expert at the narrowest width does not fit.
    """
    fmt = get_nested_format(storage_bits)
    widths = fmt.derived_bits
    sizes: dict[int, list[int]] = {}  # layer -> bytes of one expert at each width
    for entry, arrays in per_expert.items():
        layer = int(entry.split(".")[1])
        row = sizes.setdefault(layer, [0] * len(widths))
        for i in range(len(widths)):
            row[i] += width_bytes(arrays, i + 1)
    experts = [(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts)]
    freq = {(l, e): float(frequencies[l][e]) if frequencies and l in frequencies else 0.0 for l, e in experts}
    level = {x: len(widths) - 1 for x in experts}
    total = sum(sizes[l][-1] for l, _ in experts)
    smallest = sum(sizes[l][0] for l, _ in experts)
    if smallest > budget_bytes:
        raise MoecError(f"memory budget {budget_bytes / 1e6:.3f} MB is below the narrowest plan's "
                        f"{smallest / 1e6:.3f} MB of routed experts (every expert at {widths[0]} bits)")
    last = None
    for x in sorted(experts, key=lambda x: (freq[x], x)):  # coldest first
        if total <= budget_bytes:
            break
        layer = x[0]
        total -= sizes[layer][-1] - sizes[layer][0]
        level[x] = 0
        last = x
    if total <= budget_bytes and last is not None:  # the last evicted expert takes the widest width that fits
        layer = last[0]
        for i in range(len(widths) - 1, 0, -1):
            if total - sizes[layer][0] + sizes[layer][i] <= budget_bytes:
                total += sizes[layer][i] - sizes[layer][0]
                level[last] = i
                break
    plan = base.copy()
    plan.experts = {layer: {e: widths[level[(layer, e)]] for e in range(cfg.num_experts)} for layer in cfg.moe_layers}
    plan.provenance = {"policy": f"adapt-memory-{budget_bytes / 1e6:.3f}MB"}
    return plan


def parse_adapt(spec: str) -> tuple[str, float]:
    """``memory:MB`` → ("memory", bytes); ``latency:MS`` → ("latency", seconds); ``energy:J`` →
    ("energy", joules per token); ``drift:TV`` → ("drift", threshold); one-line errors otherwise."""
    kind, _, value = spec.partition(":")
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if kind not in ("memory", "latency", "energy", "drift") or not number > 0 or (kind == "drift" and number >= 1):
        raise MoecError(f"--adapt expects memory:MB, latency:MS, energy:J (a positive number) or drift:TV "
                        f"(a total-variation threshold in (0, 1)), got {spec[:40]!r}")
    return {"memory": (kind, number * 1e6), "latency": (kind, number / 1e3)}.get(kind, (kind, number))



def profile_frequencies(path: Path) -> dict[int, np.ndarray]:
    """Per-layer routing frequencies of a bundle's ``profile.json`` (``moec.profile.stats`` JSON, read
    without torch: the runtime stays light)."""
    d = read_json(path, "profile")
    try:
        return {int(layer): np.asarray(v["frequency"], dtype=float) for layer, v in d["derived"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MoecError(f"profile '{path}' is malformed: {exc}") from None


class LatencyController:
    """``--adapt latency:MS``: keep the decode step time under a target by moving along a plan ladder.

    The ladder is a list of plans from the widest (most bytes) to the narrowest, each the
    :func:`memory_plan` of an evenly spaced expert-byte budget, so every rung evicts colder experts
    first. After each step the controller sees the step's seconds; over a window of ``window``
    steps, a median above the target moves one rung narrower, a median under ``hysteresis`` × the
    target moves one rung wider. At most one switch per window; the target can change at any time.
    """

    def __init__(self, ladder: list[BitPlan], target_s: float, window: int = 8, hysteresis: float = 0.7) -> None:
        if not ladder:
            raise MoecError("a latency controller needs at least one plan")
        if not target_s > 0:
            raise MoecError(f"latency target must be positive, got {target_s!r}")
        self.ladder, self.target_s, self.window, self.hysteresis = ladder, target_s, window, hysteresis
        self.rung = 0
        self._times: list[float] = []

    def observe(self, seconds: float) -> BitPlan | None:
        """Record one step's time; the plan to switch to now, or None to keep the plan in force."""
        self._times.append(seconds)
        if len(self._times) < self.window:
            return None
        median = float(np.median(self._times))
        self._times = []
        if median > self.target_s and self.rung < len(self.ladder) - 1:
            self.rung += 1
        elif median < self.hysteresis * self.target_s and self.rung > 0:
            self.rung -= 1
        else:
            return None
        return self.ladder[self.rung]


def plan_ladder(cfg: MoEConfig, base: BitPlan, storage_bits: int, per_expert: dict[str, dict[str, int]],
                rungs: int = 8, frequencies: dict[int, np.ndarray] | None = None) -> list[BitPlan]:
    """``rungs`` memory plans from every expert at the widest width down to every expert at the narrowest."""
    widths = get_nested_format(storage_bits).derived_bits
    per_width = []
    for i in (0, len(widths) - 1):
        total = 0
        for entry, arrays in per_expert.items():
            total += cfg.num_experts * width_bytes(arrays, i + 1)
        per_width.append(total)
    low, high = per_width
    budgets = np.linspace(high, low, max(rungs, 2))
    return [memory_plan(cfg, base, storage_bits, per_expert, float(b), frequencies) for b in budgets]


class DriftMonitor:
    """Online routing frequencies of a nested bundle's decode steps against the calibration profile.

    Each decode step of a nested bundle returns its routed expert ids per MoE layer
    (``BundleSession.last_routed``, ``[MoE layers, top_k]``); the monitor counts them over a window
    of ``window`` tokens. At the window's end, per layer, the routing distribution ``p`` (counts /
    (window · top_k)) is compared with the calibration one ``q`` (profile frequency / its sum;
    uniform without a profile) by total variation ``TV = ½ Σ_e |p_e − q_e|`` (0: same, 1: disjoint);
    ``distance`` is the mean over MoE layers and ``drifted`` is set when it exceeds ``threshold``
    (default 0.2: a fifth of the routing mass has moved to other experts). ``online`` keeps the
    window's per-token frequencies for the re-plan; :meth:`rebase` makes them the new reference, so
    one shift re-plans once.
    """

    def __init__(self, layers: list[int], num_experts: int, calibration: dict[int, np.ndarray] | None = None,
                 window: int = 64, threshold: float = 0.2) -> None:
        if window < 1 or not 0 < threshold < 1:
            raise MoecError(f"drift window must be >= 1 token and threshold in (0, 1), got {window}, {threshold}")
        self.layers, self.num_experts, self.window, self.threshold = list(layers), num_experts, window, threshold
        self.rebase(calibration)
        self._counts = np.zeros((len(self.layers), num_experts))
        self._tokens = 0
        self.distance: float | None = None
        self.history: list[float] = []  # distance of every closed window
        self.online: dict[int, np.ndarray] | None = None
        self.drifted = False

    def rebase(self, frequencies: dict[int, np.ndarray] | None) -> None:
        """Compare the next windows with ``frequencies`` (None: uniform routing)."""
        rows = []
        for layer in self.layers:
            f = np.ones(self.num_experts) if frequencies is None else np.asarray(frequencies[layer], float)
            rows.append(f / f.sum() if f.sum() > 0 else np.full(self.num_experts, 1.0 / self.num_experts))
        self._reference = np.stack(rows)

    def observe(self, routed: np.ndarray) -> None:
        """Count one decode step's routed ids (``[MoE layers, top_k]``); close the window when full."""
        routed = np.asarray(routed).reshape(len(self.layers), -1)
        for i, row in enumerate(routed):
            np.add.at(self._counts[i], row[(row >= 0) & (row < self.num_experts)], 1.0)
        self._tokens += 1
        if self._tokens < self.window:
            return
        top_k = routed.shape[1]
        p = self._counts / (self._tokens * top_k)
        self.distance = float(np.mean(0.5 * np.abs(p - self._reference).sum(axis=1)))
        self.history.append(self.distance)
        self.online = {layer: self._counts[i] / self._tokens for i, layer in enumerate(self.layers)}
        self.drifted = self.drifted or self.distance > self.threshold
        self._counts = np.zeros_like(self._counts)
        self._tokens = 0


class DriftController:
    """``--adapt drift:TV``: when the session's :class:`DriftMonitor` sees drift, re-plan at the same bytes.

    The re-plan is :func:`memory_plan` with the window's online frequencies and the expert bytes of
    the plan in force as the budget: hot experts (online) are promoted, cold ones demoted, and the
    plan reads no more than before. Same ``observe(seconds)`` interface as :class:`LatencyController`.
    """

    def __init__(self, session, monitor: DriftMonitor) -> None:
        self.session, self.monitor = session, monitor
        self.replans = 0

    def observe(self, seconds: float) -> BitPlan | None:
        m = self.monitor
        if not m.drifted:
            return None
        m.drifted = False
        plan = self.session.drift_plan(m.online)
        m.rebase(m.online)
        self.replans += 1
        return plan
