"""BundleSession: a loaded bundle (verified), its VM, device-resident weights and a generation loop."""

from __future__ import annotations

import gc
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm.runtime
from tokenizers import Tokenizer

from moec.artifact.bundle import verified_bytes, verified_copy, verify_bundle
from moec.artifact.resident_keys import SUFFIX, cache_key, param_key
from moec.artifact.weights_file import device_params
from moec.core.config import config_from_dict
from moec.core.errors import MoecError, last_line
from moec.core.outputs import work_dir
from moec.core.plan import BitPlan
from moec.core.run_plan import plan_widths
from moec.runtime.adapt import memory_plan, plan_ladder, profile_frequencies
from moec.runtime.plan_switch import PlanSwitch, as_plan, expert_bytes, nested_array_bytes
from moec.runtime.remote import TrackerAddress, elf_machine, request_device
from moec.runtime.tensor_holder import TensorHolder
from moec.runtime.tvm_runtime import use_bundle_kernels


#: Context (KV cache capacity, tokens) a session allocates when not told: the model's position limit up to this.
DEFAULT_CONTEXT = 1024


def cache_shapes(cfg: dict, capacity: int) -> list[tuple[int, int, int]]:
    """Shapes of the KV cache buffers the decode and prefill functions take, in argument order: per layer
    ``[heads, capacity, width]`` for the key, then the value (MLA: the latent, see ``MoEConfig``)."""
    (kh, kd), (vh, vd) = config_from_dict(cfg, "bundle model config").kv_cache_shapes()
    return [shape for _ in range(cfg["num_layers"]) for shape in ((kh, capacity, kd), (vh, capacity, vd))]


def new_cache(cfg: dict, capacity: int, dev) -> list:
    """Zeroed KV cache tensors on ``dev`` (every page touched now, not during decode steps)."""
    return [tvm.runtime.tensor(np.zeros(shape, np.float32), dev) for shape in cache_shapes(cfg, capacity)]


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    #: Plan switches made during the generation (nested bundles; ``set_plan`` from ``on_token``).
    switches: list[PlanSwitch] = field(default_factory=list)
    #: Mean routed-expert width in force at the end (nested bundles), else None.
    average_bits: float | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps per second (the first new token comes from the prompt's last step)."""
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")

log = logging.getLogger("moec")


class BundleSession:
    """Load ``bundle`` (every file's sha256 checked first) on this CPU, or on ``remote`` (an RPC session).

    On a remote device the library is uploaded and loaded there, the weights are copied into its
    memory once, and each decode step runs the Relax VM there (only the token goes in and the
    logits come back; the KV cache stays on the device).

    The KV cache is allocated once per layer at a fixed capacity, ``context`` tokens (default: the
    model's ``max_position_embeddings`` up to ``DEFAULT_CONTEXT``), and every call writes its tokens'
    keys and values into it in place. A call that would pass the capacity raises a one-line
    :class:`MoecError`; :meth:`generate` enlarges a cache whose size was not given to what it needs.

    ``threads`` is the TVM thread count of decode steps and prefills, ``prefill_threads`` that of
    prefills alone (defaults: :func:`choose_threads`: a small bundle decodes on one thread and
    prefills prompts of ``PREFILL_POOL_TOKENS`` or more on the pool; a larger one runs on the pool).
    ``prefill`` (or ``MOEC_PREFILL``): ``call`` feeds a prompt through the bundle's ``prefill`` function where it
    has one, ``steps`` as decode steps (:data:`PREFILL_MODES`).
    """

    def __init__(self, bundle: str | os.PathLike, remote=None, trust: str | os.PathLike | None = None,
                 threads: int | None = None, trust_verified: bool = False, context: int | None = None,
                 prefill_threads: int | None = None, prefill: str | None = None) -> None:
        root = self._root = Path(bundle)
        self.prefill_mode = prefill_mode(prefill)  # before anything is loaded: a bad value is one line
        # the whole bundle verifies (and, with ``trust``, its signature) before lib.so is touched;
        # ``trust_verified`` (opt-in) skips re-hashing files unchanged since their last full check
        self.manifest = verify_bundle(root, trust, trust_verified=trust_verified)
        self.cfg = self.manifest["model"]["config"]
        self.remote = remote
        target = self.manifest.get("target", {})
        device = self.manifest.get("backend", {}).get("runtime_device", target.get("family", "cpu"))
        if device not in RUNTIME_DEVICES:
            raise MoecError(f"bundle '{root}' is for target '{target.get('name')}' (runs on {device}); "
                            f"this runtime runs {' and '.join(RUNTIME_DEVICES)} bundles only")
        self.device_kind = device
        if device == "cuda" and remote is None:
            require_local_cuda(root)  # before lib.so is touched: one line, not a CUDA driver traceback
        lib_path = root / "lib.so"
        lib_arch = elf_machine(lib_path) or "unknown"
        host = target.get("tvm_host") if device == "cuda" else None
        triple = (host or target.get("tvm_target", {})).get("mtriple", "")
        built_for = f"{lib_arch}" + (f" ({triple})" if triple else "")
        if remote is None and lib_arch != "unknown" and lib_arch != platform.machine():
            raise MoecError(f"{lib_path} is built for {built_for} but this machine is {platform.machine()}; "
                            "run it on a matching device (moec run --rpc HOST:PORT --key KEY)")
        lib, failure = None, None
        with work_dir("moec-run-") as private:
            checked = verified_copy(root, "lib.so", self.manifest, private)  # never the path an attacker can swap
            try:
                if remote is None:
                    self.dev = tvm.runtime.cuda(0) if device == "cuda" else tvm.runtime.cpu()
                    cuda = self.manifest.get("cuda") or {}
                    if device == "cuda" and cuda.get("fatbin"):  # the shipped fatbin, not a compile at load
                        use_bundle_kernels(verified_bytes(root, "kernels.cu", self.manifest),
                                           verified_bytes(root, cuda["fatbin"], self.manifest), cuda["arch"], self.dev)
                    lib = tvm.runtime.load_module(str(checked))
                else:
                    remote.upload(str(checked), "moec_lib.so")
                    lib = remote.load_module("moec_lib.so")
                    self.dev = remote.cuda(0) if device == "cuda" else remote.cpu()
                    if device == "cuda" and not self.dev.exist:
                        failure = "the remote device has no CUDA GPU (or TVM there is built without CUDA)"
            except MoecError:
                raise
            except Exception as exc:
                failure = last_line(exc)
        if failure is not None:  # raised outside the except block: the TVM error's frames hold the session
            where = "this machine" if remote is None else "the remote device"
            hint = f" (is the device {lib_arch}?)" if remote is not None and lib_arch != "unknown" else ""
            self.remote = remote = None
            raise MoecError(f"cannot load {lib_path} (built for {built_for}) on {where}{hint}: {failure}")
        if remote is None:  # decode and prefill thread counts (choose_threads); each call sets its own
            self.threads = configure_threads(self.manifest, threads, prefill_threads)
            self.thread_choice = choose_threads(self.manifest, threads, prefill_threads)
            self.prefill_threads = self.thread_choice.prefill  # of prompts of thread_choice.pool_from+ tokens
        self.vm = tvm.runtime.vm.VirtualMachine(lib, self.dev)
        # zero-copy views of the mapped weights.bin only for the local CPU; a GPU gets device copies
        self.params = device_params(root, self.manifest["params"], self.dev,
                                    zero_copy=remote is None and device == "cpu")
        # on a remote device the weights and caches are held in its tensor cache, for the resident entries
        self._holder = TensorHolder.for_bundle(remote, self.manifest)
        if self._holder is not None:
            self._holder.hold(self.params, param_key)
        tok = root / "tokenizer.json"
        self.tokenizer = Tokenizer.from_file(str(tok)) if "tokenizer.json" in self.manifest["files"] else None
        self.eos = self.manifest.get("eos_token_id")
        self._token = {}  # decode/prefill input tensors, reused while the length matches
        self._sent: dict[tuple[str, int], tuple] = {}  # remote resident calls: (entry, tokens) -> token, pos tensors
        self._greedy = None  # remote resident calls: the last call's [greedy token, logits all finite] (device)
        self._local: dict[str, tuple] = {}  # local CPU: entry -> (VM function, token buffer, its tensor view)
        self._pos = None  # local CPU: (position buffer, its tensor view)
        limit = self.cfg["max_position"]
        if context is not None and (isinstance(context, bool) or not isinstance(context, int)
                                    or not 1 <= context <= limit):
            raise MoecError(f"context must be a whole number of tokens from 1 to the model's "
                            f"max_position_embeddings ({limit}), got {context!r}")
        self._context_given = context is not None
        self.capacity = context if context is not None else min(limit, DEFAULT_CONTEXT)
        self.cache = self._new_cache(self.capacity)
        self.calls = 0  # decode steps and prefills run since load
        self.switches: list[PlanSwitch] = []
        self.last_routed: np.ndarray | None = None  # nested bundles: routed ids of the last decode step
        self.drift = None  # a moec.runtime.adapt.DriftMonitor fed every decode step, when set
        self._init_plan()
        self.reset()

    # -- run-time plans (nested bundles) ------------------------------------------------
    @property
    def nested(self) -> bool:
        """Whether the routed experts' widths can switch at run time (``moec compile --nested``)."""
        return "nested" in self.manifest

    def _init_plan(self) -> None:
        self._plan = BitPlan.from_json(self.manifest["plan"], source="bundle plan")
        if not self.nested:
            return
        self._model_cfg = config_from_dict(self.cfg, "bundle model config")
        self._storage = self.manifest["nested"]["storage_bits"]
        names = self.manifest["params"]
        self._table_index = {n: i for i, n in enumerate(names) if n.endswith(".experts.prec")}
        self._tables = plan_widths(self._model_cfg, self._plan, self._storage)
        self._per_expert = nested_array_bytes(names, [(p.shape, str(p.dtype)) for p in self.params])

    @property
    def plan(self) -> BitPlan:
        """The plan in force (for a nested bundle: its routed-expert widths are the ones being served)."""
        return self._plan

    def _frequencies(self):
        return profile_frequencies(self._root / "profile.json") if "profile.json" in self.manifest["files"] else None

    def plan_front(self) -> list[tuple[BitPlan, dict]]:
        """The manifest's ``plan_front`` (``moec.search.nested_front``, computed at compile time): each
        plan, widest first, with its modelled ``bytes_per_token``, ``latency_s``, ``energy_j``; [] for a
        nested bundle compiled before the front existed."""
        if not self.nested:
            raise MoecError("this bundle's plan is fixed at compile time; compile it with --nested 8 to adapt "
                            "expert widths at run time")
        out = []
        for entry in self.manifest.get("plan_front", []):
            plan = self._plan.copy()
            plan.experts = {int(l): dict(enumerate(row)) for l, row in entry["experts"].items()}
            plan.provenance = {"policy": f"plan-front-{entry['mean_bits']:.2f}bits"}
            out.append((plan, {k: v for k, v in entry.items() if k != "experts"}))
        return out

    def energy_plan(self, joules: float) -> BitPlan:
        """The widest front plan whose modelled energy per decode step is at most ``joules`` (the search's
        estimator: bytes · pJ/byte + ops · pJ/op of the bundle's target)."""
        front = self.plan_front()
        if not front:
            raise MoecError("this bundle has no plan front (compile it again with --nested to adapt to energy)")
        for plan, cost in front:
            if cost["energy_j"] <= joules:
                return plan
        raise MoecError(f"energy budget {joules:.4g} J/token is below the narrowest plan's modelled "
                        f"{front[-1][1]['energy_j']:.4g} J/token")

    def plan_ladder(self, rungs: int = 8) -> list[BitPlan]:
        """Plans from every expert widest to every expert narrowest, colder experts narrowed first
        (the rungs a :class:`moec.runtime.adapt.LatencyController` moves along): the bundle's plan
        front when it has one, else ``rungs`` memory plans computed here."""
        front = [plan for plan, _ in self.plan_front()]
        if front:
            return front
        return plan_ladder(self._model_cfg, self._plan, self._storage, self._per_expert, rungs, self._frequencies())

    def memory_plan(self, budget_bytes: float) -> BitPlan:
        """The plan whose routed experts read at most ``budget_bytes``, coldest experts narrowest first
        (``moec.runtime.adapt``; frequencies from the bundle's ``profile.json`` when it has one)."""
        if not self.nested:
            raise MoecError("this bundle's plan is fixed at compile time; compile it with --nested 8 to adapt "
                            "expert widths at run time")
        return memory_plan(self._model_cfg, self._plan, self._storage, self._per_expert, budget_bytes,
                           self._frequencies())

    def drift_monitor(self, window: int = 64, threshold: float = 0.2):
        """Start counting online routing against the bundle's profile (uniform without one): ``self.drift``."""
        from moec.runtime.adapt import DriftMonitor
        if not self.nested:
            raise MoecError("this bundle's plan is fixed at compile time; compile it with --nested 8 to adapt "
                            "expert widths at run time")
        self.drift = DriftMonitor(list(self._model_cfg.moe_layers), self._model_cfg.num_experts,
                                  self._frequencies(), window, threshold)
        return self.drift

    def drift_plan(self, online: dict) -> BitPlan:
        """The plan reading at most the plan in force's expert bytes, widths given by ``online`` frequencies
        (hot experts widest, coldest evicted first: :func:`moec.runtime.adapt.memory_plan`)."""
        plan = memory_plan(self._model_cfg, self._plan, self._storage, self._per_expert, self.expert_bytes(), online)
        plan.provenance = {"policy": "adapt-drift"}
        return plan

    def expert_bytes(self) -> int | None:
        """Routed-expert bytes the plan in force reads when every expert is used (nested bundles)."""
        return expert_bytes(self._storage, self._per_expert, self._tables) if self.nested else None

    def set_plan(self, plan: "BitPlan | dict | str | os.PathLike") -> PlanSwitch:
        """Serve the routed experts at ``plan``'s widths from the next call on (nested bundles).

        No rebuild and no reload: the width tables among the parameters are overwritten in place; the KV cache
        is kept. ``plan`` is a BitPlan, plan JSON, a plan file or ``uniform:B``; only its routed-expert
        widths are used. A plan asking for a width the storage does not serve, naming an unknown
        layer or expert, or made for another model raises a one-line :class:`MoecError` and the
        plan in force stays.
        """
        t0 = time.perf_counter()
        if not self.nested:
            raise MoecError("this bundle's plan is fixed at compile time; compile it with --nested 8 to switch "
                            "expert widths at run time")
        new = as_plan(plan, self._model_cfg)
        tables = plan_widths(self._model_cfg, new, self._storage)  # raises before anything changes
        for n, a in tables.items():  # written into the same device buffers (all validated above): kernels
            self.params[self._table_index[n]].copyfrom(a)  # replayed from a captured CUDA graph keep addresses
        changed = int(sum((tables[n] != self._tables[n]).sum() for n in tables))
        self._tables, self._plan = tables, new
        widths = np.concatenate(list(tables.values()))
        switch = PlanSwitch(self.calls, time.perf_counter() - t0, changed, float(widths.mean()),
                            expert_bytes(self._storage, self._per_expert, tables))
        self.switches.append(switch)
        log.info("plan switch at call %d: %d expert(s) changed, mean %.2f bits, %.2f MB of experts, %.2f ms",
                 switch.step, changed, switch.average_bits, switch.expert_bytes / 1e6, switch.seconds * 1e3)
        return switch

    def close(self) -> None:
        """Release the device: on a remote device this ends the RPC session, freeing the server.

        Remote tensors, the module and the VM all hold the session, and TVM objects form
        reference cycles, so everything is dropped and collected here rather than left to the GC.
        """
        remote = self.remote
        if getattr(self, "_holder", None) is not None:
            self._holder.release()  # the device's copies of the weights and caches, with the RPC session kept
        for name in ("cache", "_pos", "_token", "_sent", "_greedy", "params", "_local", "vm", "dev", "_holder",
                     "remote"):
            if hasattr(self, name):
                delattr(self, name)
        if remote is not None:
            del remote
            gc.collect()

    def __enter__(self) -> "BundleSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        """Start a new sequence: the next token goes to position 0 (the cache buffers are reused)."""
        self.pos = 0

    def kv_cache(self) -> list[np.ndarray]:
        """Copies of the filled part of each cache buffer (``[heads, pos, width]``, key then value per layer)."""
        return [t.numpy()[:, :self.pos] for t in self.cache]

    def reserve(self, tokens: int) -> None:
        """Enlarge the cache to ``tokens`` (at the start of a sequence, when its size was not given: a session
        opened with ``context`` keeps it, and a call past it is refused)."""
        if tokens > self.capacity and not self._context_given and self.pos == 0:
            self.cache = None  # the old buffers go before the new ones are made
            self.capacity = tokens
            self.cache = self._new_cache(tokens)

    def _new_cache(self, capacity: int) -> list:
        cache = new_cache(self.cfg, capacity, self.dev)
        if self._holder is not None:
            self._holder.hold(cache, cache_key)  # replaces the old caches there (freed)
        return cache

    @property
    def has_prefill(self) -> bool:
        """Whether prompts go through the bundle's ``prefill`` function (a whole prompt in one call): it has one,
        and the session was not asked to feed prompts as decode steps (``prefill="steps"``)."""
        return "prefill" in self.manifest.get("entry", {}) and self.prefill_mode == "call"

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Feed ``tokens`` at the next positions in one call (decode steps if the bundle has no
        ``prefill``); returns the logits [V] after the last one."""
        return self._feed(tokens, fetch=True)

    def _feed(self, tokens: list[int], fetch: bool) -> np.ndarray | None:
        """:meth:`prefill`; the logits only if ``fetch`` (see :meth:`_run`)."""
        if not self.has_prefill:
            for t in tokens:
                logits = self._run("decode", [t], fetch)
            return logits
        return self._run("prefill", tokens, fetch)

    def step(self, token: int) -> np.ndarray:
        """Run one decode step for ``token`` at the next position; returns logits [V]."""
        return self._run("decode", [token])

    def _advance(self, tokens: list[int], prompt: bool) -> int:
        """Feed the ``prompt`` (as :meth:`prefill`) or one token (a decode step) and return the greedy next token;
        on a remote device holding the bundle only that token and a finiteness flag come back, the logits stay
        there."""
        if self._holder is None:
            return int(np.argmax(_finite(self.prefill(tokens) if prompt else self.step(tokens[0]), self.pos)))
        if prompt:
            self._feed(tokens, fetch=False)
        else:
            self._run("decode", tokens, fetch=False)
        best, finite = self._greedy.numpy()
        if not finite:
            raise _non_finite(self.pos)
        return int(best)

    def _run(self, entry: str, tokens: list[int], fetch: bool = True) -> np.ndarray | None:
        """Call ``entry`` (decode or prefill) on ``tokens`` at position ``self.pos``: the call writes their
        keys and values into the cache in place; ``pos`` then moves past them. Returns the logits; on a remote
        device holding the bundle, only if ``fetch`` (else the greedy token waits in ``_greedy``)."""
        if self.pos + len(tokens) > self.capacity:
            raise MoecError(f"the KV cache is full: {len(tokens)} more token(s) at position {self.pos} pass its "
                            f"capacity of {self.capacity} tokens; open the session with a larger context "
                            f"(BundleSession(context=...), moec run --context)")
        self.calls += 1
        pos = self.pos
        if self.remote is None and self.device_kind == "cpu":
            # the token and position buffers are numpy arrays TVM reads in place (DLPack): writing them
            # is the whole input transfer; the VM function handle is looked up once
            fn, buf, inp = self._local.get(entry, (None, None, None))
            if buf is None or buf.shape[0] != len(tokens):
                buf = _aligned(len(tokens), np.int32)
                fn, inp = self.vm[entry], tvm.runtime.from_dlpack(buf)
                self._local[entry] = (fn, buf, inp)
            if self._pos is None:
                self._pos = (_aligned(1, np.int64),)
                self._pos += (tvm.runtime.from_dlpack(self._pos[0]),)
            buf[:] = tokens
            self._pos[0][0] = pos
            use_threads(self.thread_choice.for_prefill(len(tokens)) if entry == "prefill" else self.threads)
            out = fn(inp, self._pos[1], *self.cache, *self.params)
            self.pos = pos + len(tokens)
            self._keep_outputs(entry, out)
            return np.from_dlpack(out[0])[0]  # a view: the logits tensor lives as long as the array
        tokens = np.asarray(tokens, np.int32)
        where = np.array([pos], np.int64)
        if self._holder is not None:  # a remote device holding the weights and caches
            return self._run_resident(entry, tokens, where, fetch)
        if self.remote is None:
            inp = self._token.get(entry)
            if inp is None or inp.shape[0] != tokens.shape[0]:
                inp = self._token[entry] = tvm.runtime.tensor(tokens, self.dev)
            else:
                inp.copyfrom(tokens)  # no allocation per decode step
            use_threads(self.thread_choice.for_prefill(len(tokens)) if entry == "prefill" else self.threads)
            out = self.vm[entry](inp, tvm.runtime.tensor(where, self.dev), *self.cache, *self.params)
            self.pos = pos + len(tokens)
            self._keep_outputs(entry, list(out))
            return out[0].numpy()[0]
        # over RPC (a bundle without resident entries): the stateful interface, every tensor copied each call
        return self._call_remote(entry, entry, [tvm.runtime.tensor(tokens, self.dev),
                                                tvm.runtime.tensor(where, self.dev), *self.cache, *self.params],
                                 len(tokens))

    def _run_resident(self, entry: str, tokens: np.ndarray, where: np.ndarray, fetch: bool) -> np.ndarray | None:
        """Over RPC, the resident entry: weights and caches held on the device, the token and position sent into
        tensors kept there (one copy each, no allocation per call); the logits fetched only if ``fetch``."""
        key = (entry, len(tokens))
        if key not in self._sent:
            self._sent[key] = (tvm.runtime.tensor(tokens, self.dev), tvm.runtime.tensor(where, self.dev))
        inputs = self._sent[key]
        return self._call_remote(entry, entry + SUFFIX, list(inputs), len(tokens), fetch,
                                 sends=zip(inputs, (tokens, where)))

    def _call_remote(self, entry: str, name: str, args: list, count: int, fetch: bool = True,
                     sends=()) -> np.ndarray | None:
        """``name`` on ``count`` tokens through the stateful interface (a VM function cannot be called directly
        over RPC), after copying each ``(device tensor, array)`` of ``sends``."""
        failure = None
        try:
            for tensor, array in sends:
                tensor.copyfrom(array)
            self.vm.set_input(name, *args)
            self.vm.invoke_stateful(name)
            out = self.vm.get_outputs(name)
            logits = out[0].numpy()[0] if fetch else None
        except Exception as exc:  # TVM RPC errors: the server died or the session expired
            failure = last_line(exc)
        if failure is not None:  # raised outside the except block, which would keep the session alive
            raise MoecError(f"the remote device failed during a {entry} call: {failure}")
        self.pos += count
        self._keep_outputs(entry, [out[i] for i in range(len(out))])
        return logits

    def _keep_outputs(self, entry: str, out: list) -> None:
        """Over RPC without resident entries, the caches the call wrote (``set_input`` had copied them); after a
        nested bundle's decode call, its routed ids (``last_routed``, the last output) and counts."""
        n = len(self.cache)
        held = self._holder is not None  # resident entries return (logits, greedy token and flag, [routed])
        if held:
            self._greedy = out[1]
        elif self.remote is not None:
            self.cache = [out[i] for i in range(1, 1 + n)]
        if entry == "decode" and len(out) > (2 if held else 1 + n):
            self.last_routed = out[-1].numpy()  # [MoE layers, top_k] int32
            if self.drift is not None:
                self.drift.observe(self.last_routed)

    def check_positions(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise MoecError unless the prompt and ``max_new_tokens`` fit the model's position limit."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise MoecError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        limit = self.cfg["max_position"]
        if prompt_tokens + max_new_tokens - 1 > limit:  # the last new token is never fed back
            raise MoecError(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                            f"model's max_position_embeddings ({limit}); shorten the prompt or generate fewer tokens")
        need = prompt_tokens + max_new_tokens - 1
        if need > self.capacity and self._context_given:
            raise MoecError(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) needs a KV cache "
                            f"of {need} tokens but the session's context is {self.capacity}; open it with a larger "
                            "context (BundleSession(context=...), moec run --context)")

    def generate(self, prompt_ids: list[int], max_new_tokens: int,
                 on_token: Callable[[int], None] | None = None) -> tuple[list[int], GenerationStats]:
        """Greedy generation: the prompt in one ``prefill`` call (filling the KV cache), then decode steps."""
        if not prompt_ids:
            raise MoecError("prompt is empty")
        self.check_positions(len(prompt_ids), max_new_tokens)
        self.reset()
        self.reserve(len(prompt_ids) + max_new_tokens - 1)  # the last new token is never fed back
        first_switch = len(self.switches)
        t0 = time.perf_counter()
        nxt = self._advance(list(prompt_ids), prompt=True)
        t1 = time.perf_counter()
        out: list[int] = []
        for _ in range(max_new_tokens):
            out.append(nxt)
            if on_token is not None:
                on_token(nxt)
            if self.eos is not None and nxt == self.eos:
                break
            if len(out) < max_new_tokens:
                nxt = self._advance([nxt], prompt=False)
        t2 = time.perf_counter()
        bits = float(np.concatenate(list(self._tables.values())).mean()) if self.nested else None
        return out, GenerationStats(len(prompt_ids), len(out), t1 - t0, t2 - t1, self.switches[first_switch:], bits)


#: Devices ``BundleSession`` runs bundles on (a backend's ``runtime_device``).
RUNTIME_DEVICES = ("cpu", "cuda")


def cuda_available() -> bool:
    """Whether this process sees a CUDA GPU through TVM's CUDA runtime."""
    try:
        return bool(tvm.runtime.cuda(0).exist)
    except Exception:  # noqa: BLE001 - a TVM built without CUDA raises rather than answering False
        return False


def require_local_cuda(bundle: str | os.PathLike) -> None:
    """Raise a one-line :class:`MoecError` unless a CUDA GPU is usable here."""
    if not cuda_available():
        raise MoecError(f"bundle '{bundle}' is a CUDA bundle but this machine has no usable CUDA GPU (no driver "
                        "or device seen by TVM); run it on a GPU machine or a Jetson (moec run --rpc HOST:PORT)")


SMALL_BUNDLE_BYTES = 32 << 20
#: Yields a pool worker spins for before it sleeps when the pool only prefills (see :func:`configure_threads`).
POOL_SPIN_COUNT = 2000
_POOL_SET: int | None = None  # the size use_threads last gave the pool
_DEFAULT_POOL: int | None = None  # TVM's own default, read before configure_threads first sets the env


#: Prompt tokens from which a small bundle's prefill runs on the pool by default (see :func:`choose_threads`).
PREFILL_POOL_TOKENS = 32


@dataclass(frozen=True)
class ThreadChoice:
    """TVM threads of a session's calls: ``decode`` steps, and ``prefill`` calls of at least ``pool_from``
    tokens (shorter prefills run on ``decode``'s count; see :func:`choose_threads`)."""

    decode: int
    prefill: int
    pool_from: int = 0

    def for_prefill(self, tokens: int) -> int:
        """The thread count of a prefill of ``tokens`` tokens."""
        return self.prefill if tokens >= self.pool_from else self.decode


def _default_pool() -> int:
    """The pool size moec uses for large bundles: ``TVM_NUM_THREADS`` or ``OMP_NUM_THREADS`` as the
    process started with, else every core (read once, without asking TVM, which would start its pool)."""
    global _DEFAULT_POOL
    if _DEFAULT_POOL is None:
        _DEFAULT_POOL = int(os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
                            or os.cpu_count() or 1)
    return _DEFAULT_POOL


#: How a session feeds a prompt: ``call`` (the bundle's ``prefill`` function where it has one) or ``steps``
#: (decode steps: the fallback if a device's prefill misbehaves, e.g. a GPU driver; ``MOEC_PREFILL=steps``).
PREFILL_MODES = ("call", "steps")


def prefill_mode(mode: str | None = None) -> str:
    """``mode``, else ``MOEC_PREFILL``, else ``call``; a one-line error for anything but :data:`PREFILL_MODES`."""
    given = mode if mode is not None else os.environ.get("MOEC_PREFILL") or "call"
    if given not in PREFILL_MODES:
        source = "prefill" if mode is not None else "MOEC_PREFILL"
        raise MoecError(f"{source} must be one of {', '.join(PREFILL_MODES)}, got {given!r}")
    return given


def _env_count(name: str) -> int | None:
    if not os.environ.get(name):
        return None
    try:
        return int(os.environ[name])
    except ValueError:
        raise MoecError(f"{name} must be a whole number, got {os.environ[name]!r}") from None


def choose_threads(manifest: dict, threads: int | None = None, prefill_threads: int | None = None) -> ThreadChoice:
    """The thread counts of a session (nothing is configured here).

    ``threads`` (or ``MOEC_NUM_THREADS``) sets both kinds of call; otherwise a bundle whose weights
    are under ``SMALL_BUNDLE_BYTES`` decodes on one thread and a larger one on TVM's pool. A decode
    step of a small model is ~100 kernels of a few microseconds: a fork-join over two threads per
    kernel gains little, and on a loaded machine every join waits for a worker that the scheduler
    has preempted (on the reference model one decode step in six took 25-40 ms instead of under
    1 ms with two threads; the stalls went away with one).

    A prefill is compute-bound GEMMs and attention over the whole prompt, which the pool shares out:
    a small bundle's prefill of at least ``PREFILL_POOL_TOKENS`` prompt tokens runs on the pool
    (every core), shorter ones on the decode count (on an idle 2-core x86 VM the reference model's
    prefill broke even on 2 threads at 8-16 tokens and gained 1.3x at 32, 1.4x at 64, 1.7x at
    512; see the README's "Prefill threads: the crossover"). On a busy machine the pool loses (at
    a load average of 7-9 on 2 cores a 64-token prefill ran at 0.3-0.6x its 1-thread rate):
    ``prefill_threads`` (or ``MOEC_PREFILL_THREADS``) sets the count of every prefill, whatever its
    length, and so does ``threads`` when it is given alone.
    """
    if threads is None:
        threads = _env_count("MOEC_NUM_THREADS")
    if prefill_threads is None:
        prefill_threads = _env_count("MOEC_PREFILL_THREADS")
    if threads is not None or prefill_threads is not None:  # explicit counts win, for every prompt length
        decode = threads if threads is not None else _default_decode(manifest)
        choice = ThreadChoice(decode, decode if prefill_threads is None else prefill_threads)
    elif _default_decode(manifest) == 1:  # a small bundle: long prompts on the pool
        choice = ThreadChoice(1, _default_pool(), PREFILL_POOL_TOKENS if _default_pool() > 1 else 0)
    else:
        choice = ThreadChoice(_default_pool(), _default_pool())
    for n in (choice.decode, choice.prefill):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise MoecError(f"threads must be a whole number >= 1, got {n!r}")
    return choice


def _default_decode(manifest: dict) -> int:
    """The decode count of a bundle without an explicit choice: one thread when small, else the pool."""
    return 1 if manifest.get("weight_bytes", SMALL_BUNDLE_BYTES) < SMALL_BUNDLE_BYTES else _default_pool()


def configure_threads(manifest: dict, threads: int | None = None, prefill_threads: int | None = None) -> int:
    """Set TVM's CPU thread pool for this process to the decode count of :func:`choose_threads`; return it.

    TVM's parallel launch runs a kernel's tasks inline on the calling thread only when its
    concurrency is 1: that is the pool size ``runtime.config_threadpool`` last set (it overrides
    ``TVM_NUM_THREADS``, which is set to the same count for pools TVM starts later). With a 2-thread
    pool and ``TVM_NUM_THREADS=1`` every parallel loop still went through the pool's hand-off (a
    decode step of the reference model: 380 instead of 260 us of CPU). :func:`use_threads` switches
    the pool between a session's decode and prefill counts (a few microseconds).
    The pool is process-wide: the session of the last call sets it. The calling thread keeps the CPUs it
    had (TVM pins it to core 0 when resizing the pool: two one-thread moec processes then shared one
    core, and so did every subprocess started after the session opened).
    """
    choice = choose_threads(manifest, threads, prefill_threads)
    if _POOL_SET is None and choice.decode == 1 < choice.prefill:
        # the pool serves prefills only: its workers spin POOL_SPIN_COUNT yields before they sleep,
        # not TVM's 300,000, which kept a worker spinning through the one-thread decode steps after a
        # pool prefill (at load ~2 on 2 cores, decode after a 2-thread prefill averaged 2.4-2.7k tok/s
        # against 4.0-5.8k with 2,000). A pool that decodes keeps TVM's spin: its kernels follow each
        # other closely (the OLMoE-shaped uniform:4 bundle: 82-89 tok/s with 300,000, 73-86 with 2,000).
        # Read once, when TVM makes its pool; a TVM_THREAD_POOL_SPIN_COUNT given wins.
        os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(POOL_SPIN_COUNT))
    use_threads(choice.decode)
    return choice.decode


def use_threads(n: int) -> None:
    """Make TVM's next kernel launches use ``n`` threads (resize the pool, set ``TVM_NUM_THREADS``); nothing
    when the pool already has that size, so a decode step does not pay for it.

    TVM creates its pool's workers once, at its first use, from ``TVM_NUM_THREADS`` or, unset, half the
    cores on x86 (it assumes SMT: one worker on a 2-core machine), and a later resize cannot add
    workers. So before the first resize the variable is set to the larger of ``n`` and
    :func:`_default_pool` (all the cores): a session that starts on one thread (a small bundle)
    and later needs the pool (a large one, a prefill count of its own) gets all of it. Without that,
    the OLMoE-shaped uniform:8 bundle decoded at 50 tok/s on one worker after a one-thread session,
    against 68-74 tok/s on two (quiet 2-core x86 VM, 2026-12-03). A pool at the size asked for is
    not resized.
    """
    global _POOL_SET
    if n == _POOL_SET:
        return
    if _POOL_SET is None:  # the pool may not exist yet: it will be made from this, with every worker
        os.environ["TVM_NUM_THREADS"] = str(max(n, _default_pool()))
    if n != (_POOL_SET if _POOL_SET is not None else _default_pool()):
        # TVM binds the calling thread to core 0 when it resizes the pool; every process (and every
        # child it starts, which inherits the mask) would then share one core. Keep the caller's cores.
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        tvm.get_global_func("runtime.config_threadpool")(1, n)
        if cores is not None:
            os.sched_setaffinity(0, cores)
    os.environ["TVM_NUM_THREADS"] = str(n)
    _POOL_SET = n


def _aligned(n: int, dtype) -> np.ndarray:
    """A zeroed array of ``n`` ``dtype`` starting on a 64-byte boundary (what TVM's DLPack import requires)."""
    size = np.dtype(dtype).itemsize
    raw = np.zeros(n + 64 // size, dtype)
    start = (-raw.ctypes.data % 64) // size
    return raw[start:start + n]


def _non_finite(position: int) -> MoecError:
    return MoecError(f"the bundle produced non-finite logits (NaN/Inf) at position {position}; "
                     "its weights are corrupt or overflow")


def _finite(logits: np.ndarray, position: int) -> np.ndarray:
    if not np.isfinite(logits).all():
        raise _non_finite(position)
    return logits


def open_remote_bundle(bundle: str | Path, tracker: str, key: str | None = None, timeout: float = 60.0,
                       session_timeout: float = 0.0, trust: str | Path | None = None, context: int | None = None):
    """A ``BundleSession`` of ``bundle`` on a device requested from ``tracker`` (``HOST:PORT``).

    ``key`` defaults to the bundle's target preset ``rpc_key``.
    """
    addr = TrackerAddress.parse(tracker)
    manifest = verify_bundle(Path(bundle), trust)  # before asking for a device
    if key is None:
        key = manifest["target"].get("rpc_key")
        if not key:
            raise MoecError(f"bundle '{bundle}' names no rpc_key; pass --key")
    log.info("requesting a '%s' device from tracker %s", key, addr)
    remote = request_device(addr, key, timeout=timeout, session_timeout=session_timeout)
    try:
        return BundleSession(bundle, remote=remote, trust=trust, context=context)
    except BaseException:
        remote = None  # end the RPC session now (the traceback keeps this frame), freeing the device
        gc.collect()
        raise
