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
    try:
        hf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoecError(f"{cfg_file} is not valid JSON: {exc}") from None
    if not isinstance(hf, dict) or not hf.get("architectures"):
        raise MoecError(f"{cfg_file} has no 'architectures' field")
    return hf


def load_config(path: str | os.PathLike) -> MoEConfig:
    hf = read_hf_config(path)
    return get_adapter(hf["architectures"][0]).config(hf)


def _safetensor_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MoecError(f"{index} is not a valid safetensors index") from None
        files = sorted({root / f for f in weight_map.values()})
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


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, as float32."""
    tensors: dict[str, torch.Tensor] = {}
    for f in _safetensor_files(Path(path)):
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as exc:
            raise MoecError(f"cannot read {f.name}: corrupt or truncated safetensors ({exc})") from None
        tensors.update({k: v.float() for k, v in part.items()})
    return tensors


def load_checkpoint(path: str | os.PathLike) -> MoEModel:
    """Load a local HF MoE checkpoint directory into a canonical :class:`MoEModel` (eval mode)."""
    hf = read_hf_config(path)
    adapter = get_adapter(hf["architectures"][0])
    cfg = adapter.config(hf)
    state = adapter.to_canonical(cfg, read_tensors(path))
    model = MoEModel(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise MoecError(f"checkpoint tensors do not match config.json: {' '.join(first[:2])}") from None
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
