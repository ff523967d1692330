"""BundleSession: a loaded bundle (verified), its VM, device-resident weights and a generation loop."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm.runtime
from tokenizers import Tokenizer

from moec.artifact.bundle import read_manifest
from moec.errors import MoecError


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps per second (the first new token comes from the prompt's last step)."""
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")


class BundleSession:
    """Load ``bundle`` (every file's sha256 checked first) on ``device`` ("cpu" or an RPC session)."""

    def __init__(self, bundle: str | os.PathLike, remote=None) -> None:
        root = Path(bundle)
        self.manifest = read_manifest(root, verify=True)
        self.cfg = self.manifest["model"]["config"]
        lib_path = root / "lib.so"
        try:
            if remote is None:
                lib = tvm.runtime.load_module(str(lib_path))
                self.dev = tvm.runtime.cpu()
            else:
                remote.upload(str(lib_path), "moec_lib.so")
                lib = remote.load_module("moec_lib.so")
                self.dev = remote.cpu()
        except Exception as exc:
            raise MoecError(f"cannot load {lib_path} on this device: {str(exc).strip().splitlines()[-1]}") from None
        self.vm = tvm.runtime.vm.VirtualMachine(lib, self.dev)
        weights = np.load(root / "weights.npz", allow_pickle=False)
        self.params = [tvm.runtime.tensor(weights[name], self.dev) for name in self.manifest["params"]]
        tok = root / "tokenizer.json"
        self.tokenizer = Tokenizer.from_file(str(tok)) if "tokenizer.json" in self.manifest["files"] else None
        self.eos = self.manifest.get("eos_token_id")
        self._empty = np.zeros((self.cfg["num_kv_heads"], 0, self.cfg["head_dim"]), np.float32)
        self.reset()

    def reset(self) -> None:
        self.past = [tvm.runtime.tensor(self._empty, self.dev) for _ in range(2 * self.cfg["num_layers"])]

    @property
    def has_prefill(self) -> bool:
        """Whether the bundle has a ``prefill`` function (a whole prompt in one call)."""
        return "prefill" in self.manifest.get("entry", {})

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Feed ``tokens`` at the next positions in one call (decode steps if the bundle has no
        ``prefill``); returns the logits [V] after the last one."""
        if not self.has_prefill:
            for t in tokens:
                logits = self.step(t)
            return logits
        ids = tvm.runtime.tensor(np.asarray(tokens, np.int32), self.dev)
        out = self.vm["prefill"](ids, *self.past, *self.params)
        self.past = [out[i] for i in range(1, len(out))]
        return out[0].numpy()[0]

    def step(self, token: int) -> np.ndarray:
        """Run one decode step for ``token`` at the next position; returns logits [V]."""
        out = self.vm["decode"](tvm.runtime.tensor(np.array([token], np.int32), self.dev), *self.past, *self.params)
        self.past = [out[i] for i in range(1, len(out))]
        return out[0].numpy()[0]

    def generate(self, prompt_ids: list[int], max_new_tokens: int,
                 on_token: Callable[[int], None] | None = None) -> tuple[list[int], GenerationStats]:
        """Greedy generation: the prompt in one ``prefill`` call (filling the KV cache), then decode steps."""
        if not prompt_ids:
            raise MoecError("prompt is empty")
        self.reset()
        t0 = time.perf_counter()
        logits = self.prefill(list(prompt_ids))
        t1 = time.perf_counter()
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(logits))
            out.append(nxt)
            if on_token is not None:
                on_token(nxt)
            if self.eos is not None and nxt == self.eos:
                break
            if len(out) < max_new_tokens:
                logits = self.step(nxt)
        t2 = time.perf_counter()
        return out, GenerationStats(len(prompt_ids), len(out), t1 - t0, t2 - t1)
