"""Typed entry points for every pipeline stage: the facade the CLI calls; nothing inside moec imports it.

The stages live in ``moec.pipeline`` (profile / eval, search, export, compile / build); this
module only gathers their configs and functions under one name.
"""

from __future__ import annotations

from moec.core.errors import MoecError
from moec.core.plan import BitPlan, resolve_plan
from moec.pipeline.bundle_eval import BundleEval, evaluate_bundle, is_bundle
from moec.pipeline.compile import CompileConfig, build_from_onnx, compile_bundle
from moec.export.inspect import inspect_file
from moec.pipeline.export import export_onnx
from moec.pipeline.finetune import FinetuneConfig, FinetuneOptions, FinetuneResult, finetune
from moec.pipeline.profile import DataConfig, PlanEval, SensitivityConfig, evaluate, profile
from moec.pipeline.search import SearchConfig, SearchOutcome, search

__all__ = ["BitPlan", "BundleEval", "CompileConfig", "DataConfig", "FinetuneConfig", "FinetuneOptions", "FinetuneResult",
           "MoecError", "PlanEval", "SearchConfig", "SearchOutcome",
           "SensitivityConfig", "build_from_onnx", "compile_bundle", "evaluate", "evaluate_bundle", "export_onnx", "finetune", "inspect_file",
           "is_bundle", "profile", "resolve_plan", "search"]
