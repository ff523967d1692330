"""Timing both engines for ``peer_llamacpp.py``: llama-bench at its best setting, moec's BundleSession.

Tests are named ``decode`` (64 generated tokens after an empty / 16-token prompt) and ``ppN``
(a prefill of N prompt tokens on an empty cache); every figure is tokens per second.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

from peer_common import LLAMA_ENV

DECODE_TOKENS = 64


def llama_bench(root: Path, gguf: Path, threads: list[int], policy: str, tests: list[str],
                reps: int, gen_tokens: int = DECODE_TOKENS) -> dict[tuple[str, int], float]:
    """``{(test, threads): tok/s}`` from one ``llama-bench`` run (its mean over ``reps`` repetitions,
    after its warm-up run) with ``OMP_WAIT_POLICY=policy``; ``decode`` generates ``gen_tokens``."""
    prompts = [t[2:] for t in tests if t.startswith("pp")]
    gen = gen_tokens if "decode" in tests else 0
    out = subprocess.run([str(root / "build/bin/llama-bench"), "-m", str(gguf), "-t", ",".join(map(str, threads)),
                          "-p", ",".join(prompts) or "0", "-n", str(gen), "-r", str(reps), "-o", "jsonl"],
                         env=dict(LLAMA_ENV, OMP_WAIT_POLICY=policy), check=True, capture_output=True,
                         text=True).stdout
    res = {}
    for row in (json.loads(ln) for ln in out.splitlines() if ln.startswith("{")):
        test = "decode" if row["n_gen"] else f"pp{row['n_prompt']}"
        if test in tests:
            res[(test, int(row["n_threads"]))] = float(row["avg_ts"])
    return res


def settings(max_threads: int) -> list[tuple[int, str]]:
    """(threads, OpenMP wait policy) pairs llama.cpp is tried at: 1 thread, and ``max_threads`` with
    each policy. On a small model a 2-thread llama.cpp spends its step in thread barriers: with
    ``OMP_WAIT_POLICY=PASSIVE`` (needed on a loaded machine) it fell to ~250 tok/s on a quiet one,
    against ~5000 with one thread, so llama.cpp gets its best, as moec picks its own thread count."""
    out = [(1, "PASSIVE")]
    if max_threads > 1:
        out += [(max_threads, "PASSIVE"), (max_threads, "ACTIVE")]
    return out


def label(setting: tuple[int, str]) -> str:
    t, policy = setting
    return f"-t {t}" + (f" {policy.lower()}" if t > 1 else "")


def llama_times(root: Path, gguf: Path, tests: list[str], candidates: list[tuple[int, str]],
                reps: int, gen_tokens: int = DECODE_TOKENS) -> tuple[dict[str, float], dict[str, tuple[int, str]]]:
    """Each test's best tok/s over ``candidates`` and the setting that gave it.

    Settings of one wait policy share a ``llama-bench`` run (``-t 1,2``).
    """
    best: dict[str, float] = {}
    won: dict[str, tuple[int, str]] = {}
    for policy in sorted({p for _, p in candidates}):
        threads = sorted({t for t, p in candidates if p == policy})
        for (test, t), tps in llama_bench(root, gguf, threads, policy, tests, reps, gen_tokens).items():
            if tps > best.get(test, 0.0):
                best[test], won[test] = tps, (t, policy)
    return best, won


def llama_probe(root: Path, gguf: Path, tests: list[str],
                max_threads: int) -> tuple[dict[str, tuple[int, str]], dict[str, float]]:
    """llama.cpp's best setting per test from a short probe over :func:`settings` (``decode`` generating
    16 tokens, and the shortest prompt, whose winner every prompt length gets; one repetition), and
    the probe's tok/s that each test's setting came from."""
    prompts = sorted((t for t in tests if t.startswith("pp")), key=lambda t: int(t[2:]))
    probe = (["decode"] if "decode" in tests else []) + prompts[:1]
    best, won = llama_times(root, gguf, probe, settings(max_threads), 1, gen_tokens=16)
    source = {t: "decode" if t == "decode" else prompts[0] for t in tests}
    return {t: won[source[t]] for t in tests}, {t: best[source[t]] for t in tests}


def llama_at(root: Path, gguf: Path, winners: dict[str, tuple[int, str]], probe: dict[str, float], reps: int,
             max_threads: int) -> tuple[dict[str, float], dict[str, tuple[int, str]]]:
    """tok/s of each test at its probe winner (tests sharing a setting share a ``llama-bench`` run), and
    the settings used. A test that ran at under half its probe's speed (on a loaded machine an
    actively waiting 2-thread run can collapse 10x after winning the probe) is timed again at every
    setting and keeps the best."""
    out: dict[str, float] = {}
    for setting in set(winners.values()):
        mine = [t for t, s in winners.items() if s == setting]
        out.update(llama_times(root, gguf, mine, [setting], reps)[0])
    used = dict(winners)
    slow = [t for t in winners if out[t] < 0.5 * probe[t]]
    if slow:
        again, won = llama_times(root, gguf, slow, settings(max_threads), reps)
        for t in slow:
            if again[t] > out[t]:
                out[t], used[t] = again[t], won[t]
    return out, used


def moec_times(bundle: Path, prompts: list[int], threads: int | None, reps: int) -> dict[str, float]:
    """moec's tok/s: ``decode`` (64 steps after a 16-token prompt; ``decode_p50``: at the median step)
    and ``ppN`` for each prompt length
    (a prefill on an empty cache), each the mean over ``reps`` runs after an untimed warm-up
    (a prefill of the longest prompt and 8 steps: the mapped weights' pages are read in and the
    VM's buffers for that prompt length allocated before timing, as llama-bench's warm-up run does;
    with a 64-token warm-up the first 512-token prefill paid ~2x for its first-touch page faults)."""
    from moec.runtime.session import BundleSession

    sess = BundleSession(bundle, threads=threads, trust_verified=True)
    try:
        longest = max([64, *prompts])
        prompt = [3 + i % 97 for i in range(longest)]
        sess.prefill(prompt)  # the longest prompt: its first prefill also allocates the VM's larger buffers
        for i in range(8):
            sess.step(5 + i)
        out = {}
        steps = []
        for _ in range(reps):
            sess.reset()
            sess.prefill(prompt[:16])
            for i in range(DECODE_TOKENS):
                t0 = time.perf_counter()
                sess.step(5 + i % 50)
                steps.append(time.perf_counter() - t0)
        out["decode"] = len(steps) / sum(steps)
        out["decode_p50"] = 1 / statistics.median(steps)  # robust to the preempted steps of a loaded machine
        for n in prompts:
            spent = 0.0
            for _ in range(reps):
                sess.reset()
                t0 = time.perf_counter()
                sess.prefill(prompt[:n])
                spent += time.perf_counter() - t0
            out[f"pp{n}"] = reps * n / spent
        return out
    finally:
        sess.close()
