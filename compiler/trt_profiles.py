"""TensorRT optimization profiles: one per phase the graph spec declares, read from the manifest.

Never written by hand and never a rule of their own: each graph's spec (`btp.graphs.spec`) gives every
symbolic dim a (min, opt, max) per phase under the build's `Bounds`, `btp-compile` records them in the
manifest, and a profile is those ranges put into each input's shape. Stage graphs get two profiles over one
copy of the weights (prefill, decode), embed too; the other graphs run in prefill only.
"""

from __future__ import annotations

from btp.runtime.errors import ArtifactError


def profiles(inputs: list, phases: list) -> list[dict[str, tuple[list[int], ...]]]:
    """`inputs` (a graph's manifest `TensorInfo`s) and its `PhaseInfo`s -> per phase, input name -> (min, opt,
    max) shapes."""
    out = []
    for phase in phases:
        shapes = {}
        for t in inputs:
            lo, opt, hi = [], [], []
            for d in t.shape:
                r = (d, d, d) if isinstance(d, int) else phase.dims[d]
                lo.append(r[0])
                opt.append(r[1])
                hi.append(r[2])
            shapes[t.name] = (lo, opt, hi)
        out.append(shapes)
    return out


def manifest_profiles(manifest, name: str) -> list[dict[str, tuple[list[int], ...]]]:
    """The profiles `btp-compile` built graph `name`'s engine with, from the phases its manifest records."""
    info = manifest.graphs[name]
    if not info.phases:
        raise ArtifactError(f"graph {name}: the manifest records no phase ranges (an artifact from before they "
                            "were recorded); rebuild it with btp-compile")
    return profiles(info.inputs, info.phases)
