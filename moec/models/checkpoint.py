"""Load and save Hugging Face checkpoint directories (config.json + safetensors, sharded or not)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moec.core.errors import MoecError
from moec.core.config import MoEConfig
from moec.models.learned_quant import load_learned_quant
from moec.models.model import MoEModel
from moec.models.registry import get_adapter


def read_hf_config(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint directory, with one-line errors for every way it can be wrong."""
    root = Path(path)
    if not root.exists():
        raise MoecError(f"checkpoint directory '{root}' does not exist")
    if not root.is_dir():
        raise MoecError(f"'{root}' is not a directory (expected a Hugging Face checkpoint directory)")
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise MoecError(f"'{root}' has no config.json")
    from moec.core.io import read_json_strict
    hf = read_json_strict(cfg_file, "config.json", max_bytes=4 << 20)
    if not isinstance(hf, dict) or not hf.get("architectures"):
        raise MoecError(f"{cfg_file} has no 'architectures' field")
    if not isinstance(hf["architectures"], list) or not isinstance(hf["architectures"][0], str):
        raise MoecError(f"{cfg_file}: 'architectures' must be a list of names")
    return hf


def load_config(path: str | os.PathLike) -> MoEConfig:
    hf = read_hf_config(path)
    return _adapter_config(get_adapter(hf["architectures"][0]), hf, path)


def _adapter_config(adapter, hf: dict, path) -> MoEConfig:
    """The adapter's MoEConfig; a field of the wrong kind (a list where a number belongs, ...) is one line."""
    try:
        return adapter.config(hf)
    except (TypeError, ValueError, AttributeError, KeyError, ZeroDivisionError, OverflowError) as exc:
        raise MoecError(f"{Path(path) / 'config.json'} has a malformed field ({type(exc).__name__}: "
                        f"{str(exc)[:120]})") from None


def _safetensor_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        from moec.core.io import read_json_strict
        data = read_json_strict(index, "safetensors index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise MoecError(f"{index} is not a valid safetensors index (no 'weight_map' of file names)")
        files = sorted({_shard_path(root, f, index) for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MoecError(f"shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        bins = list(root.glob("*.bin")) + list(root.glob("*.pt"))
        hint = " (pickle .bin/.pt weights are never loaded; convert to safetensors)" if bins else ""
        raise MoecError(f"'{root}' has no *.safetensors files{hint}")
    return files


def _shard_path(root: Path, name: str, index: Path) -> Path:
    """A shard named by the index: a plain file name inside the checkpoint directory, nothing else."""
    p = root / name
    if not name or "/" in name or "\\" in name or name in (".", "..") or Path(name).is_absolute():
        raise MoecError(f"{index.name} names shard {name[:80]!r} outside the checkpoint directory; refusing it")
    if p.is_symlink() and not p.resolve().is_relative_to(root.resolve()):
        raise MoecError(f"{index.name}: shard '{name}' is a link outside the checkpoint directory; refusing it")
    return p


#: MXFP4 expert tensors (gpt-oss) kept as uint8 for the adapter to dequantize.
MXFP4_SUFFIXES = ("_proj_blocks", "_proj_scales")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t: torch.Tensor, source: str) -> None:
    """A weight must be floating point and finite: an int or NaN/Inf weight silently corrupts every result."""
    if t.dtype not in FLOAT_DTYPES:
        raise MoecError(f"{source}: tensor '{name}' has dtype {str(t.dtype).removeprefix('torch.')}; "
                        "weights must be float32, float16, bfloat16 or float64")
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise MoecError(f"{source}: tensor '{name}' has {bad} non-finite value(s) (NaN or Inf)")


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, as float32 (each checked: floating dtype, finite values)."""
    tensors: dict[str, torch.Tensor] = {}
    for f in _safetensor_files(Path(path)):
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as exc:
            raise MoecError(f"cannot read {f.name}: corrupt or truncated safetensors ({exc})") from None
        for k, v in part.items():
            if v.dtype == torch.uint8 and k.endswith(MXFP4_SUFFIXES):  # dequantized by the adapter
                tensors[k] = v
                continue
            check_tensor(k, v, f.name)
            tensors[k] = v.float()
    return tensors


def load_checkpoint(path: str | os.PathLike) -> MoEModel:
    """Load a local HF MoE checkpoint directory into a canonical :class:`MoEModel` (eval mode)."""
    hf = read_hf_config(path)
    adapter = get_adapter(hf["architectures"][0])
    cfg = _adapter_config(adapter, hf, path)
    state = adapter.to_canonical(cfg, read_tensors(path))
    if cfg.tie_embeddings:  # the head is the embedding (one parameter, two state-dict names)
        state["lm_head.weight"] = state["embed.weight"]
    model = MoEModel(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise MoecError(f"checkpoint tensors do not match config.json: {' '.join(first[:2])}") from None
    # a fine-tuned checkpoint's learned scales / zeros (moec finetune): packing uses them
    model.learned_quant = load_learned_quant(path, cfg)
    return model.eval()


def save_checkpoint(model: MoEModel, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> None:
    """Write ``model`` as an HF checkpoint directory of its own architecture (per-expert layout)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    adapter = get_adapter(model.cfg.architecture)
    hf_cfg = adapter.to_hf_config(model.cfg)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    tensors = {k: v.to(dtype).contiguous() for k, v in adapter.to_hf(model.cfg, state).items()}
    hf_cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")


class ShardedWriter:
    """Writes an HF checkpoint directory one part at a time (block-wise fine-tuning never holds the whole
    model): each :meth:`write` of canonical tensors becomes one safetensors shard; :meth:`finish` writes
    ``model.safetensors.index.json`` and ``config.json``. :func:`load_checkpoint` and ``LazyCheckpoint``
    read the result like any sharded checkpoint."""

    def __init__(self, root: str | os.PathLike, cfg: MoEConfig, parts: int, dtype: torch.dtype = torch.float32) -> None:
        self.root, self.cfg, self.parts, self.dtype = Path(root), cfg, parts, dtype
        self.adapter = get_adapter(cfg.architecture)
        self.weight_map: dict[str, str] = {}
        self.written = 0

    def write(self, state: dict[str, torch.Tensor]) -> None:
        if self.cfg.tie_embeddings:
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        tensors = {k: v.detach().to(self.dtype).contiguous() for k, v in self.adapter.to_hf_part(self.cfg, state).items()}
        self.written += 1
        name = f"model-{self.written:05d}-of-{self.parts:05d}.safetensors"
        save_file(tensors, str(self.root / name), metadata={"format": "pt"})
        self.weight_map.update({k: name for k in tensors})

    def finish(self) -> None:
        if self.written != self.parts:
            raise MoecError(f"sharded checkpoint has {self.written} of {self.parts} parts")
        hf_cfg = self.adapter.to_hf_config(self.cfg)
        hf_cfg["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        (self.root / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"format": "pt"}, "weight_map": dict(sorted(self.weight_map.items()))}, indent=1) + "\n")
        (self.root / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
