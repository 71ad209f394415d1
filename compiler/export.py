"""Export one `graphs` module to ONNX with the dynamo exporter, everything derived from its I/O spec.

Example inputs, dynamic dims and the names written into the ONNX file all come from `module.spec()`:
the symbolic dims `batch`, `seq`, `past`, `image_tokens` become `torch.export.Dim`s over their ranges in the
spec's phases under the build's `Bounds`, and derived dims (`past + seq`, `seq - 32`) are left to the exporter,
which proves them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from btp.graphs import GraphSpec
from btp.graphs.spec import PATCHES, TOTAL
from btp.runtime.chain import Bounds

from .loops import expand_fill_loops, fill_to_translation, fill_translation

log = logging.getLogger(__name__)

EXPORTER = "torch.onnx.export(dynamo=True)"
# Weights above this size go to an external .data file beside the graph.
EXTERNAL_DATA_BYTES = 1 << 20


# The one bounds type (btp.runtime.chain.Bounds); `Limits` is its older name here.
Limits = Bounds


@dataclass
class Exported:
    """What one export produced."""

    name: str
    path: Path
    nodes: int
    seconds: float
    opset: int


def export_dims(spec: GraphSpec, bounds: Bounds) -> dict[str, tuple[int, int]]:
    """The (min, max) each symbolic input dim is exported with: its range over the spec's phases. Derived dims
    (`past + seq`) are the exporter's to infer."""
    return {d: r for d, r in spec.dim_bounds(bounds).items() if d != TOTAL}


def _traced(spec: GraphSpec, bounds: Bounds) -> dict[str, tuple[int, int]]:
    """The ranges the exporter traces with: a range of one value (`--max-batch 1`) is widened by one, since
    torch.export cannot make a dim of one value dynamic and a static graph would not be the spec's."""
    return {d: (lo, max(hi, lo + 1)) for d, (lo, hi) in export_dims(spec, bounds).items()}


def _dims(spec: GraphSpec, bounds: Bounds) -> dict[str, object]:
    ranges = _traced(spec, bounds)
    dims: dict[str, object] = {d: Dim(d, min=lo, max=hi) for d, (lo, hi) in ranges.items()}
    dims[TOTAL] = Dim.AUTO
    if PATCHES in dims:  # a fixed number of patches merge into each image token
        dims[PATCHES] = dims["image_tokens"] * (ranges[PATCHES][0] // ranges["image_tokens"][0])
    return dims


def example_inputs(spec: GraphSpec, bounds: Bounds, image_token_id: int, image_tokens: int, seq: int
                   ) -> list[torch.Tensor]:
    """Valid example tensors for `spec` (batch 2, `seq` tokens, past 3, each inside its exported range): sizes
    of 0 or 1 would be specialised by the exporter, so every dynamic dim is at least 2 where its range allows."""
    ranges = _traced(spec, bounds)

    def pick(dim: str, want: int) -> int:
        lo, hi = ranges.get(dim, (want, want))
        return min(max(want, lo), hi)

    sizes = {"batch": pick("batch", 2), "seq": pick("seq", seq), "past": pick("past", 3),
             "image_tokens": pick("image_tokens", image_tokens)}  # within the build's image-token range
    sizes[TOTAL] = sizes["past"] + sizes["seq"]
    if PATCHES in ranges:  # patches of one image: a fixed number merged into each image token
        sizes[PATCHES] = sizes["image_tokens"] * (ranges[PATCHES][0] // ranges["image_tokens"][0])
    g = torch.Generator().manual_seed(0)
    out = []
    for t in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in t.shape]
        if t.name == "input_ids":
            x = torch.randint(0, max(image_token_id, 2), shape, generator=g)
            x[:, 1 : 1 + image_tokens] = image_token_id
        elif t.name == "position_ids":
            x = torch.arange(shape[-1]).expand(shape).contiguous()
        elif t.name == "attention_mask":
            x = torch.ones(shape, dtype=torch.int64)
        elif t.name == "image_start":
            x = torch.arange(1, shape[0] + 1)
        elif t.name in ("window_index", "window_inverse"):
            x = torch.arange(shape[0]).flip(0)  # a permutation and its own inverse
        elif t.name in ("vision_position_ids", "window_ids"):
            x = torch.randint(0, 4, shape, generator=g)
        elif t.name == "image_span":
            x = torch.arange(shape[0])
        elif t.dtype.is_floating_point:
            x = (torch.randn(shape, generator=g) * 0.1).to(t.dtype)
        else:
            raise ValueError(f"{spec.name}: no example rule for input {t.name}")
        out.append(x.to(t.dtype))
    return out


def _structure(n_fixed: int, items: list):
    """Group the dynamic shapes of trailing inputs under the forward's `*args`, as torch.export expects."""
    return (*items[:n_fixed], tuple(items[n_fixed:])) if len(items) > n_fixed else tuple(items)


def _fixed_inputs(module: nn.Module) -> int:
    import inspect

    params = inspect.signature(module.forward).parameters.values()
    return sum(1 for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)


def _param_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def export_graph(module: nn.Module, path: Path, *, limits: Limits, opset: int, image_token_id: int,
                 image_tokens: int, alive: int = 0) -> Exported:
    """Export `module` to `path` (ONNX, opset `opset`), check it and infer shapes.

    `alive` is the image-token count a prune graph expects (its sequences hold at least that many).
    """
    import onnx

    spec = module.spec()
    dims = _dims(spec, limits)
    items = example_inputs(spec, limits, image_token_id, image_tokens, max(alive + 6, 8))
    dyn = [{i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs]
    n_fixed = _fixed_inputs(module)
    t0 = time.perf_counter()
    # The exporter's registry logs one warning per torchvision op it skips; none of ours needs torchvision.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    # Some exporter releases print their optimizer's progress ("Applied 13 of general pattern rewrite rules.",
    # onnxscript 0.6) to stdout, where `--json` reports go: it goes to stderr instead.
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(), \
            contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, tuple(items), dynamo=True, opset_version=opset,
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=_structure(n_fixed, dyn), verbose=False,
            custom_translation_table={torch.ops.btp.farthest_point_fill.default: fill_translation(),
                                      torch.ops.btp.fill_to.default: fill_to_translation()},
        )
        external = _param_bytes(module) > EXTERNAL_DATA_BYTES
        program.save(str(path), external_data=external)
    # Only the graph proto is rewritten: external weights stay where the exporter put them.
    model = onnx.load(str(path), load_external_data=False)
    expand_fill_loops(model)
    _name_dims(model, spec)
    # The bounds the graph was traced for (its rotary tables hold max_positions rows): the loader checks the
    # manifest's bounds against these, so an edited manifest cannot promise more than the graph can do.
    onnx.helper.set_model_props(model, {f"btp.{k}": str(v) for k, v in graph_bounds(limits).items()})
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path), full_check=False)
    onnx.shape_inference.infer_shapes_path(str(path), str(path))
    seconds = time.perf_counter() - t0
    nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
    return Exported(spec.name, path, nodes, seconds, opset)


def graph_bounds(limits: Limits) -> dict[str, int]:
    return {"max_batch": limits.max_batch, "max_prompt": limits.max_prompt, "max_positions": limits.max_positions}


def _name_dims(model, spec: GraphSpec) -> None:
    """Write the spec's symbolic dim names into the graph's inputs and outputs."""
    for values, tensors in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
        by_name = {t.name: t for t in tensors}
        for v in values:
            t = by_name.get(v.name)
            if t is None:
                continue
            for dim, want in zip(v.type.tensor_type.shape.dim, t.shape):
                if isinstance(want, str):
                    dim.dim_param = want
