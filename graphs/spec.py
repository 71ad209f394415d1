"""Name-keyed I/O declarations of the graphs: the one source of truth for names, dtypes and symbolic dims.

The exporter's dynamic axes, example inputs, engine profiles, runtime buffers and the manifest are all
derived from these declarations (ARCHITECTURE section 3, STYLE "One I/O spec per graph").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Symbolic dims used in shapes. Derived dims are written as expressions, e.g. "seq - 288".
BATCH = "batch"
SEQ = "seq"
PAST = "past"
TOTAL = "past + seq"
IMAGES = "image_tokens"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, dtype and shape (ints are static dims, strings symbolic ones)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    """The ordered inputs and outputs of one graph; order matches the module's forward signature."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }


def past_name(layer: int, kind: str) -> str:
    """`past_key_values.{layer}.{key|value}`, `layer` global."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """`present.{layer}.{key|value}`, `layer` global."""
    return f"present.{layer}.{kind}"
