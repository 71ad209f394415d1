"""The static layout of an engine chain: which graphs run, in what order, with what shapes.

`compiler` writes it from a model and a plan; the manifest stores it; `Pipeline` reads only this.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import torch


class Engine(Protocol):
    """One graph behind a name-keyed interface: what every backend (torch, ONNX Runtime, TensorRT) offers."""

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class Bounds:
    """The size bounds an artifact is built for, the one type of them: graphs' dim ranges, TensorRT profiles,
    the manifest's `build` and the runtime's checks all derive from it."""

    max_batch: int = 4
    max_prompt: int = 1024  # tokens, image tokens included
    max_new_tokens: int = 256
    # Image tokens per image for families whose count follows the image's size (Qwen2.5-VL); 0: the model's fixed
    # count (LLaVA). The processor resizes every image into this range.
    min_image_tokens: int = 0
    max_image_tokens: int = 0

    @property
    def max_positions(self) -> int:
        """Positions the rotary tables hold: the longest prompt plus the longest answer."""
        return self.max_prompt + self.max_new_tokens


@dataclass(frozen=True)
class StageLayout:
    """One decoder stage: its graph name, global layer ids, the prune graph that runs before it (if any)
    and the number of image tokens alive inside it."""

    name: str
    layers: tuple[int, ...]
    image_tokens: int
    prune: str | None = None


@dataclass(frozen=True)
class ChainSpec:
    """Everything the runtime needs to chain the graphs of one artifact."""

    stages: tuple[StageLayout, ...]
    image_tokens: int
    grid: tuple[int, int]
    image_size: int
    image_token_id: int
    pad_token_id: int
    eos_token_ids: tuple[int, ...]
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"
    max_positions: int = 4096  # the rotary tables' length: `bounds.max_positions` for a compiled artifact
    bounds: Bounds | None = None  # compiled artifacts: the bounds their graphs were built for
    family: str = "llava"  # whose input preparation `Pipeline.prepare` runs: "llava" or "qwen2_5_vl"
    spatial_merge: int = 1  # Qwen2.5-VL: patches per image token, a side (the vision tower's merger)
    window_tokens: int = 0  # Qwen2.5-VL: the vision tower's attention windows, a side, in image tokens

    @property
    def max_prompt(self) -> int | None:
        return self.bounds.max_prompt if self.bounds else None

    @property
    def max_batch(self) -> int | None:
        return self.bounds.max_batch if self.bounds else None

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def prunes(self) -> list[StageLayout]:
        return [s for s in self.stages if s.prune is not None]

    def to_dict(self) -> dict:
        """The manifest's `chain` document: the bounds stored flat, as `max_prompt` and `max_batch` (the answer's
        bound is `max_positions - max_prompt`)."""
        d = asdict(self)
        del d["bounds"]
        return {**d, "max_prompt": self.max_prompt, "max_batch": self.max_batch}

    @classmethod
    def from_dict(cls, data: dict) -> ChainSpec:
        d = dict(data)
        d["stages"] = tuple(StageLayout(**{**s, "layers": tuple(s["layers"])}) for s in d["stages"])
        d["grid"] = tuple(d["grid"])
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        prompt, batch = d.pop("max_prompt", None), d.pop("max_batch", None)
        if prompt is not None and batch is not None:
            d["bounds"] = Bounds(batch, prompt, d["max_positions"] - prompt)
        return cls(**d)
