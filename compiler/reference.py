"""The PyTorch reference: the runtime's chain over engines that run the `graphs` modules in torch."""

from __future__ import annotations

import torch
from torch import nn

from btp.runtime import Pipeline

from .assemble import build_graphs
from .plan import Plan
from .presets import resolve_plan


class TorchEngine:
    """A `graphs` module behind the name-keyed `run(feeds) -> outputs` contract of every backend."""

    def __init__(self, module: nn.Module):
        spec = module.spec()
        self.module = module
        self.name = spec.name
        self.input_names = spec.input_names
        self.output_names = spec.output_names

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KeyError(f"{self.name}: missing inputs {missing}")
        with torch.inference_mode():
            out = self.module(*(feeds[n] for n in self.input_names))
        out = out if isinstance(out, tuple) else (out,)
        return dict(zip(self.output_names, out))


class ReferencePipeline(Pipeline):
    """The chain over torch engines, with the checked plan it was built from."""

    def __init__(self, engines, spec, processor, plan: Plan, device):
        super().__init__(engines, spec, processor, device)
        self.plan = plan


def reference_pipeline(model, plan="none", max_positions: int | None = None,
                       per_layer: bool = False) -> ReferencePipeline:
    """`model` (a `LoadedModel`) and a plan (a `Plan`, file or preset name) -> the chain over torch engines
    (`per_layer`: one stage per layer, see `build_graphs`)."""
    checked = resolve_plan(plan, model)
    graphs, spec = build_graphs(model, checked, max_positions, per_layer)
    engines = {name: TorchEngine(g) for name, g in graphs.items()}
    return ReferencePipeline(engines, spec, model.processor, checked, next(model.hf.parameters()).device)
