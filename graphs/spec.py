"""Name-keyed I/O declarations of the graphs: the one source of truth for names, dtypes, symbolic dims and
each dim's range in each phase.

The exporter's dynamic axes and example inputs, the TensorRT profiles, `btp-check`'s profile grouping and the
manifest are all derived from these declarations and one bounds object (`btp.runtime.chain.Bounds`: max batch,
prompt and new tokens; graphs import nothing from runtime, so any object with those three fields will do).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .selection import share_count

# Symbolic dims used in shapes. Derived dims are written as expressions, e.g. "seq - 288".
BATCH = "batch"
SEQ = "seq"
PAST = "past"
TOTAL = "past + seq"
IMAGES = "image_tokens"
PATCHES = "image_patches"  # vision patches of one image before the spatial merge (Qwen2.5-VL): units * image_tokens


Range = tuple[int, int, int]  # min, opt, max


class BoundsLike(Protocol):
    max_batch: int
    max_prompt: int
    max_new_tokens: int


@dataclass(frozen=True)
class Phase:
    """One way a graph runs (prefill or decode): the (min, opt, max) of every symbolic dim it uses."""

    name: str
    dims: dict[str, Range]


# A graph's phases as a function of the bounds: what each dim means, declared once per graph kind below.
PhaseRule = Callable[[BoundsLike], tuple[Phase, ...]]


def _with_total(name: str, dims: dict[str, Range]) -> Phase:
    if PAST in dims and SEQ in dims:
        dims = {**dims, TOTAL: tuple(a + b for a, b in zip(dims[PAST], dims[SEQ]))}
    return Phase(name, dims)


def image_range(b: BoundsLike, image_tokens: int) -> tuple[int, int]:
    """The (min, max) image tokens of one image under `b`: its image-token bounds where it has them (families
    whose count follows the image's size), else the model's fixed `image_tokens`."""
    lo, hi = getattr(b, "min_image_tokens", 0), getattr(b, "max_image_tokens", 0)
    return (lo, hi) if lo and hi else (image_tokens, image_tokens)


def _alive_at(n: int, alive: int, share: float | None, shares: bool) -> int:
    """Image tokens alive at `n` image tokens: the fixed `alive`, or a share of `n` (all of them when None)."""
    if not shares:
        return alive
    return n if share is None else share_count(n, share)


def stage_phases(image_tokens: int, alive: int, alive_share: float | None = None, shares: bool = False
                 ) -> PhaseRule:
    """A decoder stage with `alive` of the `image_tokens` image tokens (with `shares`: `alive_share` of each
    image's, all when None): prefill over its pruned prompt (no past), decode one token at a time over a past of
    up to that prompt plus the new tokens."""

    def rule(b: BoundsLike) -> tuple[Phase, ...]:
        lo, hi = image_range(b, image_tokens) if shares else (image_tokens, image_tokens)
        # this stage's longest prefill sequence, over the image sizes
        length = max(b.max_prompt - n + _alive_at(n, alive, alive_share, shares) for n in range(lo, hi + 1))
        opt = max(1, length // 2)
        batch = (1, 1, b.max_batch)
        return (_with_total("prefill", {BATCH: batch, SEQ: (1, opt, length), PAST: (0, 0, 0)}),
                _with_total("decode", {BATCH: batch, SEQ: (1, 1, 1),
                                       PAST: (1, opt, length + b.max_new_tokens - 1)}))

    return rule


def prune_phases(image_tokens: int, alive: int, alive_share: float | None = None, shares: bool = False
                 ) -> PhaseRule:
    """A prune graph before which `alive` image tokens live (with `shares`: `alive_share` of each image's, all
    when None, and an `image_tokens` dim): prefill only, sequences holding them all."""

    def rule(b: BoundsLike) -> tuple[Phase, ...]:
        lo, hi = image_range(b, image_tokens) if shares else (image_tokens, image_tokens)
        sizes = range(lo, hi + 1)
        length = max(b.max_prompt - n + _alive_at(n, alive, alive_share, shares) for n in sizes)
        least = min(_alive_at(n, alive, alive_share, shares) for n in sizes) + 1
        dims = {BATCH: (1, 1, b.max_batch), SEQ: (least, max(least, length // 2), length)}
        if shares:
            dims[IMAGES] = (lo, max(lo, hi // 2), hi)
        return (Phase("prefill", dims),)

    return rule


def embed_phases(image_tokens: int) -> PhaseRule:
    """The embedding: the whole prompt with its image features (the fixed `image_tokens`, or each image's count
    within the bounds' image-token range where they have one), then one token without."""

    def rule(b: BoundsLike) -> tuple[Phase, ...]:
        batch = (1, 1, b.max_batch)
        lo, hi = getattr(b, "min_image_tokens", 0), getattr(b, "max_image_tokens", 0)
        lo, hi = (lo, hi) if lo and hi else (image_tokens, image_tokens)
        return (Phase("prefill", {BATCH: batch, SEQ: (1, b.max_prompt // 2, b.max_prompt),
                                  IMAGES: (lo, max(lo, hi // 2), hi)}),
                Phase("decode", {BATCH: batch, SEQ: (1, 1, 1), IMAGES: (0, 0, 0)}))

    return rule


def patch_phases(min_tokens: int, max_tokens: int, unit: int) -> PhaseRule:
    """A vision graph over flattened patches (Qwen2.5-VL): images of the bounds' image-token range (where they
    have none, `min_tokens..max_tokens`), `unit` patches merged into each."""

    def rule(b: BoundsLike) -> tuple[Phase, ...]:
        lo, hi = getattr(b, "min_image_tokens", 0), getattr(b, "max_image_tokens", 0)
        lo, hi = (lo, hi) if lo and hi else (min_tokens, max_tokens)
        tokens = (lo, max(lo, hi // 2), hi)
        patches = tuple(unit * t for t in tokens)
        return (Phase("prefill", {BATCH: (1, 1, b.max_batch), IMAGES: tokens, PATCHES: patches}),)

    return rule


def batch_phase(b: BoundsLike) -> tuple[Phase, ...]:
    """Graphs whose only symbolic dim is the batch (vision, head), run once per step."""
    return (Phase("prefill", {BATCH: (1, 1, b.max_batch)}),)


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
    phases: PhaseRule = field(default=batch_phase, compare=False)

    def ranges(self, bounds: BoundsLike) -> tuple[Phase, ...]:
        """Each phase's (min, opt, max) of the symbolic dims of this graph's inputs, under `bounds`."""
        used = {d for t in self.inputs for d in t.shape if isinstance(d, str)}
        out = []
        for phase in self.phases(bounds):
            missing = used - set(phase.dims)
            if missing:
                raise ValueError(f"{self.name}: phase {phase.name} gives no range for dims {sorted(missing)}")
            out.append(Phase(phase.name, {d: r for d, r in phase.dims.items() if d in used}))
        return tuple(out)

    def dim_bounds(self, bounds: BoundsLike) -> dict[str, tuple[int, int]]:
        """Per symbolic input dim, the (min, max) over all phases: what the exported graph must accept."""
        out: dict[str, tuple[int, int]] = {}
        for phase in self.ranges(bounds):
            for d, (lo, _, hi) in phase.dims.items():
                a, b = out.get(d, (lo, hi))
                out[d] = (min(a, lo), max(b, hi))
        return out

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
