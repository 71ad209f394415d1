"""The PyTorch reference: the runtime's chain over engines that run the `graphs` modules in torch."""

from __future__ import annotations

import torch
from torch import nn

from btp.runtime import Pipeline

from .assemble import build_graphs
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


def reference_pipeline(model, plan="none", max_positions: int | None = None) -> Pipeline:
    """`model` (a `LoadedModel`) and a plan (a `Plan`, file or preset name) -> `Pipeline` over torch engines."""
    checked = resolve_plan(plan, model)
    graphs, spec = build_graphs(model, checked, max_positions)
    engines = {name: TorchEngine(g) for name, g in graphs.items()}
    pipe = Pipeline(engines, spec, model.processor, device=next(model.hf.parameters()).device)
    pipe.plan = checked
    return pipe
