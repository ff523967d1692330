"""Target presets: YAML files validated strictly (an unknown or bad field names itself)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moec.core.errors import MoecError, last_line
from moec.core.formats import ALL_BITS


class EnergyModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pj_per_byte: float = Field(gt=0)
    pj_per_op: float = Field(gt=0)
    source: str


class PowerSensor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    path: str
    rail: str | None = None


class TargetPreset(BaseModel):
    """One deployment target: TVM target, toolchain, device-farm key, bits and budgets."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    family: str
    tvm_target: dict
    tvm_host: dict | None = None
    cross_compiler: str | None = None
    rpc_key: str
    allowed_bits: list[int]
    memory_budget_mb: float = Field(gt=0)
    power_sensors: list[PowerSensor] = []
    energy_model: EnergyModel
    #: CUDA targets: replay runs of static-argument kernels as CUDA graphs (``lower/pipeline.py``); false in a
    #: preset file builds bundles that launch every kernel (an off switch, and the baseline of an A/B).
    cuda_graphs: bool = True

    @field_validator("allowed_bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if b not in ALL_BITS]
        if bad:
            raise ValueError(f"unsupported bits {bad}; choose from {', '.join(map(str, ALL_BITS))}")
        return v

    def tvm(self):
        """The ``tvm.target.Target`` (``mcpu: native`` resolves to this machine's CPU)."""
        import tvm  # local: reading presets (``moec targets``, recipes) must not load TVM
        spec = dict(self.tvm_target)
        if spec.get("mcpu") == "native":
            spec["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
        try:
            target = tvm.target.Target(spec)
        except Exception as exc:  # noqa: BLE001 - TVM raises TVMError/ValueError for bad target dicts
            raise MoecError(f"target preset '{self.name}': field 'tvm_target': {last_line(exc)}") from None
        if not self.tvm_host:
            return target
        try:
            return tvm.target.Target(spec, host=dict(self.tvm_host))
        except Exception as exc:  # noqa: BLE001
            raise MoecError(f"target preset '{self.name}': field 'tvm_host': {last_line(exc)}") from None


def install_hint(compiler: str) -> str:
    """How to get ``compiler``: Debian names GNU cross compilers ``g++-TRIPLE`` / ``gcc-TRIPLE``."""
    for tool in ("g++", "gcc"):
        if compiler.endswith(f"-{tool}"):
            return f"install it with: apt-get install {tool}-{compiler[:-len(tool) - 1]}"
    return "install it or set cross_compiler in the preset"


def _builtin_dir() -> Path:
    return Path(str(resources.files("moec") / "targets"))


#: Names users type for a preset: ``jetson-orin`` is the Orin Nano (its bundles also run on an AGX Orin:
#: same sm_87 GPU and Cortex-A78AE cores).
ALIASES = {"jetson-orin": "jetson-orin-nano"}


def builtin_names() -> list[str]:
    return sorted(p.stem for p in _builtin_dir().glob("*.yaml"))


#: The CUDA arch a ``cuda`` preset builds for when none is named or detected (Ampere A100).
DEFAULT_CUDA_ARCH = "sm_80"
_SM = re.compile(r"sm_\d{2,3}[a-z]?")


def detect_cuda_arch() -> str | None:
    """``sm_XX`` of this machine's first GPU from ``nvidia-smi --query-gpu=compute_cap`` (None: no GPU/tool)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        res = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    first = res.stdout.strip().splitlines()[:1] if res.returncode == 0 else []
    m = re.fullmatch(r"(\d+)\.(\d+)", first[0].strip()) if first else None
    return f"sm_{m.group(1)}{m.group(2)}" if m else None


def resolve_cuda_arch(given: str | None = None) -> tuple[str, str]:
    """(arch, where it came from): ``given`` (``cuda:sm_XX``), $MOEC_CUDA_ARCH, nvidia-smi, or the default."""
    for arch, source in ((given, "target name"), (os.environ.get("MOEC_CUDA_ARCH"), "$MOEC_CUDA_ARCH")):
        if arch:
            if not _SM.fullmatch(arch):
                raise MoecError(f"bad CUDA arch '{arch}' (from {source}); expected e.g. sm_86 or sm_90")
            return arch, source
    detected = detect_cuda_arch()
    return (detected, "nvidia-smi") if detected else (DEFAULT_CUDA_ARCH, "default")


def load_target(name_or_path: str | os.PathLike) -> TargetPreset:
    """A built-in preset by name, or a user preset file by path.

    A preset whose ``tvm_target.arch`` is ``auto`` (the ``cuda`` preset) gets its arch here:
    ``cuda:sm_90`` names it, else :func:`resolve_cuda_arch` finds it.
    """
    s = ALIASES.get(str(name_or_path), str(name_or_path))
    arch = None
    if ":" in s and os.sep not in s and not s.endswith((".yaml", ".yml")):
        s, arch = s.split(":", 1)
    preset = _load_preset(s)
    if preset.tvm_target.get("arch") == "auto":
        resolved, _ = resolve_cuda_arch(arch)
        preset = preset.model_copy(update={"tvm_target": {**preset.tvm_target, "arch": resolved}})
    elif arch is not None:
        raise MoecError(f"target '{s}' takes no ':{arch}' (only presets with arch 'auto', e.g. cuda:sm_86)")
    return preset


def _load_preset(s: str) -> TargetPreset:
    path = Path(s) if (s.endswith((".yaml", ".yml")) or os.sep in s) else _builtin_dir() / f"{s}.yaml"
    if not path.is_file():
        if path.parent == _builtin_dir():
            raise MoecError(f"unknown target '{s}'; choices: {', '.join(builtin_names())} "
                            f"(aliases: {', '.join(f'{a} = {b}' for a, b in ALIASES.items())})")
        raise MoecError(f"target preset file '{s}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
        return TargetPreset.model_validate(data)
    except yaml.YAMLError as exc:
        raise MoecError(f"target preset '{path}' is not valid YAML: {exc}") from None
    except ValidationError as exc:
        errs = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")  # typos first
        err = errs[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise MoecError(f"target preset '{path}': field '{where}': {err['msg']}") from None
