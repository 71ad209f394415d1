"""Model loading, plans, graph assembly and the PyTorch reference (ARCHITECTURE sections 2-4, 6)."""

from btp.runtime.errors import BtpError, ModelError, PlanError
from btp.toy.builtins import BUILTINS

from .assemble import build_graphs, stage_layout
from .models import LoadedModel, config_fingerprint, load_model
from .plan import FORMAT, ModelInfo, Plan, Stage
from .presets import PRESETS, model_info, resolve_plan
from .reference import ReferencePipeline, TorchEngine, reference_pipeline

__all__ = [
    "BUILTINS",
    "FORMAT",
    "PRESETS",
    "BtpError",
    "LoadedModel",
    "ModelError",
    "ModelInfo",
    "Plan",
    "PlanError",
    "ReferencePipeline",
    "Stage",
    "TorchEngine",
    "build_graphs",
    "config_fingerprint",
    "load_model",
    "model_info",
    "reference_pipeline",
    "resolve_plan",
    "stage_layout",
]
