"""LazyCheckpoint: memory-mapped safetensors read tensor by tensor, one decoder layer at a time.

Every shard's header is parsed and checked against config.json up front (truncated shard,
missing shard, an index naming a tensor its shard lacks, a shape that disagrees with the
config, unknown or missing tensors), before any weight is read. Tensors are then read on
demand from the mapped shards, widened to float32 one at a time and dropped by the caller
after use; :meth:`LazyCheckpoint.release` drops the mapped pages so the process' resident set
stays bounded by one layer, not the model.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moec.core.errors import MoecError
from moec.models.checkpoint import MXFP4_SUFFIXES, _safetensor_files, read_hf_config
from moec.core.config import MoEConfig
from moec.models.model import DecoderLayer, MoEModel
from moec.models.registry import get_adapter

_DTYPES = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4),
           "U8": (np.uint8, 1)}  # U8: MXFP4 expert blocks/scales only (gpt-oss), see read_header
_PROJ = ("w1", "w3", "w2")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: shard file, dtype, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor table of one safetensors file, checked against the file's size (truncation)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise MoecError(f"{path.name} is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise MoecError(f"{path.name} is truncated or not a safetensors file (header of {n} bytes)")
        try:
            table = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MoecError(f"{path.name} has a corrupt safetensors header") from None
    out = {}
    for name, entry in table.items():
        if name == "__metadata__":
            continue
        dtype, shape = entry.get("dtype"), tuple(entry.get("shape", ()))
        if dtype not in _DTYPES or (dtype == "U8" and not name.endswith(MXFP4_SUFFIXES)):
            raise MoecError(f"tensor '{name}' in {path.name} has dtype {dtype}; moec reads BF16, F16 and F32")
        b, e = entry["data_offsets"]
        if e - b != int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype][1]:
            raise MoecError(f"tensor '{name}' in {path.name}: byte range disagrees with its shape {list(shape)}")
        if 8 + n + e > size:
            raise MoecError(f"{path.name} is truncated: tensor '{name}' ends at byte {8 + n + e} "
                            f"but the file has {size}")
        out[name] = TensorInfo(path, dtype, shape, 8 + n + b, 8 + n + e)
    return out


def expected_shapes(adapter, cfg: MoEConfig, present: set[str]) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape config.json implies (fused expert layout where ``present`` has it)."""
    with torch.device("meta"):
        meta = MoEModel(cfg).state_dict()
    out = {theirs: tuple(meta[ours].shape) for ours, theirs in adapter._pairs(cfg)}
    converted = adapter.converted_hf_shapes(cfg, present)
    out.update(converted)
    g, u, d = adapter.expert_names
    e, i, h = cfg.num_experts, cfg.expert_intermediate, cfg.hidden_size
    for layer in cfg.moe_layers:
        m = f"model.layers.{layer}.{adapter.moe_prefix}.experts"
        if any(n.startswith(f"{m}.") or (n.startswith(f"model.layers.{layer}.{adapter.moe_prefix}.")
                                          and n.endswith("_linear.weight")) for n in converted):
            continue  # the adapter converts this layer's experts itself (gpt-oss, Granite's input/output_linear)
        if f"{m}.gate_up_proj" in present:
            out[f"{m}.gate_up_proj"], out[f"{m}.down_proj"] = (e, 2 * i, h), (e, h, i)
            continue
        for x in range(e):
            out.update({f"{m}.{x}.{g}.weight": (i, h), f"{m}.{x}.{u}.weight": (i, h), f"{m}.{x}.{d}.weight": (h, i)})
    return out


class LazyCheckpoint:
    """A checkpoint directory opened for per-layer reads (headers checked at construction)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.root = Path(path)
        hf = read_hf_config(self.root)
        self.adapter = get_adapter(hf["architectures"][0])
        self.cfg: MoEConfig = self.adapter.config(hf)
        self.index: dict[str, TensorInfo] = {}
        index_file = self.root / "model.safetensors.index.json"
        weight_map = json.loads(index_file.read_text())["weight_map"] if index_file.is_file() else None
        for f in _safetensor_files(self.root):
            for name, info in read_header(f).items():
                if weight_map is not None and weight_map.get(name) != f.name:
                    continue  # the index decides which shard holds a name
                self.index[name] = info
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in self.index:
                    raise MoecError(f"tensor '{name}' is listed in {index_file.name} for {shard} "
                                    f"but {shard} does not contain it")
        self.index = {n: i for n, i in self.index.items() if not self.adapter.ignores(self.cfg, n)}
        self._check_shapes()
        self._maps: dict[Path, mmap.mmap] = {}
        self._live = 0
        self.bytes_read = 0

    def _check_shapes(self) -> None:
        want = expected_shapes(self.adapter, self.cfg, set(self.index))
        for name, shape in want.items():
            info = self.index.get(name)
            if info is None:
                raise MoecError(f"checkpoint is missing tensor '{name}'")
            if info.shape != shape:
                raise MoecError(f"tensor '{name}' in {info.file.name} has shape {list(info.shape)} but config.json "
                                f"implies {list(shape)}")
        extra = sorted(set(self.index) - set(want))
        if extra:
            raise MoecError(f"checkpoint has {len(extra)} tensor(s) the {self.adapter.architectures[0]} adapter "
                            f"does not understand, e.g. {', '.join(extra[:3])} (in {self.index[extra[0]].file.name})")

    # -- raw reads --------------------------------------------------------------------
    @property
    def float32_bytes(self) -> int:
        """Bytes of every tensor widened to float32 (what a whole-model load holds)."""
        return sum((i.end - i.start) // _DTYPES[i.dtype][1] * 4 for i in self.index.values())

    @property
    def stored_bytes(self) -> int:
        return sum(i.end - i.start for i in self.index.values())

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[path]

    def read_into(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """HF tensor ``name`` widened to float32 (into ``out`` if given, e.g. a slot of a stack)."""
        info = self.index[name]
        dt, width = _DTYPES[info.dtype]
        raw = np.frombuffer(self._map(info.file), dtype=dt, count=(info.end - info.start) // width, offset=info.start)
        if info.dtype == "BF16":
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.astype(np.float32)
        t = torch.from_numpy(arr.reshape(info.shape))
        self.bytes_read += info.end - info.start
        if out is None:
            self._track(arr if arr.base is None else arr.base)  # the numpy buffer lives as long as any tensor or Parameter on it
            return t
        out.copy_(t)
        return out

    def release(self) -> None:
        """Drop the mapped pages from this process (they stay in the page cache, shared)."""
        for mm in self._maps.values():
            mm.madvise(mmap.MADV_DONTNEED)

    def _track(self, buf: np.ndarray) -> None:
        self._live += 1
        weakref.finalize(buf, self._freed)

    def _freed(self) -> None:
        self._live -= 1

    def live_tensors(self) -> int:
        """How many float32 buffers this reader produced are still referenced by any tensor (tests check
        that a layer's weights are freed before the next layer is read)."""
        return self._live

    def close(self) -> None:
        self._maps.clear()

    # -- canonical names -------------------------------------------------------------
    def _pairs(self) -> dict[str, str]:
        if not hasattr(self, "_pair_map"):
            self._pair_map = dict(self.adapter._pairs(self.cfg))
        return self._pair_map

    def tensor(self, canonical: str) -> torch.Tensor:
        """One non-expert tensor by canonical name (``embed.weight``, ``norm.weight``, ``lm_head.weight``, ...)."""
        if canonical == "lm_head.weight" and self.cfg.tie_embeddings:
            canonical = "embed.weight"
        return self.read_into(self._pairs()[canonical])

    def experts(self, layer: int) -> dict[str, torch.Tensor]:
        """Stacked expert weights of ``layer``: w1/w3 [E, I, H], w2 [E, H, I], filled in place."""
        cfg, a = self.cfg, self.adapter
        e, i, h = cfg.num_experts, cfg.expert_intermediate, cfg.hidden_size
        m = f"model.layers.{layer}.{a.moe_prefix}.experts"
        bufs = {"w1": np.empty((e, i, h), np.float32), "w3": np.empty((e, i, h), np.float32),
                "w2": np.empty((e, h, i), np.float32)}
        out = {k: torch.from_numpy(v) for k, v in bufs.items()}
        if f"{m}.gate_up_proj" in self.index:
            for x in range(e):  # one expert's slice at a time: never the fused tensor in float32
                gu = self._slice(f"{m}.gate_up_proj", x)
                out["w1"][x].copy_(gu[:i])
                out["w3"][x].copy_(gu[i:])
                out["w2"][x].copy_(self._slice(f"{m}.down_proj", x))
        else:
            for x in range(e):
                for proj, theirs in zip(_PROJ, a.expert_names):
                    self.read_into(f"{m}.{x}.{theirs}.weight", out[proj][x])
        for b in bufs.values():
            self._track(b)
        return out

    def _slice(self, name: str, x: int) -> torch.Tensor:
        """Row ``x`` of a stacked [E, ...] tensor, widened to float32 (reads only that slice)."""
        info = self.index[name]
        dt, width = _DTYPES[info.dtype]
        per = int(np.prod(info.shape[1:]))
        raw = np.frombuffer(self._map(info.file), dtype=dt, count=per, offset=info.start + x * per * width)
        arr = (raw.astype(np.uint32) << 16).view(np.float32) if info.dtype == "BF16" else raw.astype(np.float32)
        self.bytes_read += per * width
        return torch.from_numpy(arr.reshape(info.shape[1:]))

    @property
    def reads_by_layer(self) -> bool:
        """Whether layers can be read one at a time: tensors are renamed only, none converted on load, and
        the embedding, final norm and head are the plain ones the per-layer stages run (no Granite
        multipliers, no LayerNorm or head bias)."""
        c = self.cfg
        plain_ends = c.norm == "rms" and not c.lm_head_bias and c.embedding_scale == c.logits_scale == 1.0
        return plain_ends and not self.adapter.converted_hf_shapes(c)

    def layer_state(self, layer: int) -> dict[str, torch.Tensor]:
        """State dict of decoder layer ``layer`` (keys relative to the layer, e.g. ``attn.q_proj.weight``)."""
        if not self.reads_by_layer:
            raise MoecError(f"{self.cfg.architecture} checkpoints cannot be read layer by layer yet (weights "
                            "converted on load, or an embedding/head the per-layer stages do not run)")
        prefix = f"layers.{layer}."
        state = {k[len(prefix):]: self.read_into(v) for k, v in self._pairs().items() if k.startswith(prefix)}
        if layer in self.cfg.moe_layers:
            state.update({f"mlp.{p}": t for p, t in self.experts(layer).items()})
        return state

    def layer(self, layer: int) -> DecoderLayer:
        """Decoder layer ``layer`` as a torch module holding only its own weights (eval mode)."""
        with torch.device("meta"):
            module = DecoderLayer(self.cfg, layer)
        try:
            module.load_state_dict(self.layer_state(layer), strict=True, assign=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise MoecError(f"layer {layer} tensors do not match config.json: {' '.join(first[:2])}") from None
        return module.eval()
