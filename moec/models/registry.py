"""Registry of family adapters keyed by HF ``architectures[0]`` (explicit imports, no package walking)."""

from __future__ import annotations

from moec.core.errors import MoecError
from moec.models.adapter import FamilyAdapter
from moec.models.deepseek import DeepseekAdapter
from moec.models.ernie import Ernie45MoeAdapter
from moec.models.glm import Glm4MoeAdapter
from moec.models.gptoss import GptOssAdapter
from moec.models.granite import GraniteMoeAdapter
from moec.models.mixtral import MixtralAdapter
from moec.models.olmoe import OlmoeAdapter
from moec.models.phimoe import PhimoeAdapter
from moec.models.qwen_moe import Qwen2MoeAdapter, Qwen3MoeAdapter

_ADAPTERS: dict[str, FamilyAdapter] = {}
for _adapter in (MixtralAdapter(), Qwen2MoeAdapter(), Qwen3MoeAdapter(), OlmoeAdapter(), DeepseekAdapter(),
                 GptOssAdapter(), Glm4MoeAdapter(), GraniteMoeAdapter(), PhimoeAdapter(), Ernie45MoeAdapter()):
    for _arch in _adapter.architectures:
        _ADAPTERS[_arch] = _adapter


def supported_architectures() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(architecture: str) -> FamilyAdapter:
    try:
        return _ADAPTERS[architecture]
    except KeyError:
        raise MoecError(f"unknown architecture '{architecture}'; supported: "
                        f"{', '.join(supported_architectures())}") from None
