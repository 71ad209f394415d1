"""TensorRT optimization profiles derived from the graphs' I/O specs and the artifact's bounds.

Never written by hand: each input's symbolic dims (`batch`, `seq`, `past`, `past + seq`, `image_tokens`)
get (min, opt, max) from the phase they run in. Stage graphs get two profiles over one copy of the weights:
prefill (past 0, up to the stage's own pruned prompt length) and decode (one token, past up to that length
plus the new tokens). Embed also has both; the other graphs run in prefill only.
"""

from __future__ import annotations

from dataclasses import dataclass

Range = tuple[int, int, int]  # min, opt, max


@dataclass(frozen=True)
class Bounds:
    max_batch: int
    max_prompt: int
    max_new_tokens: int
    image_tokens: int


def _stage_alive(chain: dict, stage: str) -> int:
    return next(st["image_tokens"] for st in chain["stages"] if st["name"] == stage)


def _alive_before(chain: dict, prune: str) -> int:
    alive = chain["image_tokens"]
    for st in chain["stages"]:
        if st.get("prune") == prune:
            return alive
        alive = st["image_tokens"]
    raise KeyError(prune)


def phase_dims(name: str, chain: dict, b: Bounds) -> list[dict[str, Range]]:
    """Per profile, the (min, opt, max) of every symbolic dim the graph `name` uses."""
    batch = (1, 1, b.max_batch)
    n0 = b.image_tokens
    if name.startswith("stage"):
        length = b.max_prompt - n0 + _stage_alive(chain, name)  # this stage's longest prefill sequence
        opt = max(1, length // 2)
        prefill = {"batch": batch, "seq": (1, opt, length), "past": (0, 0, 0)}
        decode = {"batch": batch, "seq": (1, 1, 1), "past": (1, opt, length + b.max_new_tokens - 1)}
        for p in (prefill, decode):
            p["past + seq"] = tuple(x + y for x, y in zip(p["past"], p["seq"]))
        return [prefill, decode]
    if name.startswith("prune"):
        alive = _alive_before(chain, name)
        length = b.max_prompt - n0 + alive
        return [{"batch": batch, "seq": (alive + 1, max(alive + 1, length // 2), length)}]
    if name == "embed":
        return [{"batch": batch, "seq": (1, b.max_prompt // 2, b.max_prompt), "image_tokens": (n0, n0, n0)},
                {"batch": batch, "seq": (1, 1, 1), "image_tokens": (0, 0, 0)}]
    if name == "head":  # [B,1,D]; artifacts made before the static row declared [B,seq,D] and got one row too
        return [{"batch": batch, "seq": (1, 1, 1)}]
    return [{"batch": batch}]


def manifest_profiles(manifest, name: str) -> list[dict[str, tuple[list[int], ...]]]:
    """The profiles `btp-compile` built graph `name`'s engine with, recomputed from the artifact's manifest."""
    b = manifest.build
    bounds = Bounds(b.max_batch, b.max_prompt, b.max_new_tokens, manifest.chain["image_tokens"])
    return profiles(name, manifest.graphs[name].inputs, manifest.chain, bounds)


def profiles(name: str, inputs: list, chain: dict, b: Bounds) -> list[dict[str, tuple[list[int], ...]]]:
    """`inputs` are the graph's manifest `TensorInfo`s -> per profile, input name -> (min, opt, max) shapes."""
    out = []
    for dims in phase_dims(name, chain, b):
        shapes = {}
        for t in inputs:
            lo, opt, hi = [], [], []
            for d in t.shape:
                r = (d, d, d) if isinstance(d, int) else dims[d]
                lo.append(r[0])
                opt.append(r[1])
                hi.append(r[2])
            shapes[t.name] = (lo, opt, hi)
        out.append(shapes)
    return out
