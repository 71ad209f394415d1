"""Preset plans (`none`, `btp`, `fastv`, `pdrop`, `divprune`) resolved against a model's depth and `N0`.

`btp` scales the published schedule of the model's family (BTP.md section 3: LLaVA-1.5-7B's with the released
code's selection; Qwen2.5-VL-7B's for `qwen2_5_vl`); the others are peers expressed in the same schema (points of
the same plan space) so that they compile, run, benchmark and start a calibration search the same way. On a family
whose image-token count follows the image's size (`model.dynamic`), every stage states its keep as a `share` of the
image tokens, its counts are those at the nominal `N0`, and there are no spatial seeds.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from pydantic import ValidationError

from btp.graphs.selection import SHARE_UNIT, share_count
from btp.runtime.errors import PlanError

from .plan import FORMAT, ModelInfo, Plan, Stage, _first_error
from .schedule import _layer_tokens, _round, fit_keeps, last_keep


@dataclass(frozen=True)
class Schedule:
    """A published BTP schedule on a `depth`-layer model: per stage the first reduced layer, the keep as a share of
    N0, the attention share of the keep, rho and rebalance; spatial seeds of half the first keep where `spatial`
    and the grid is square and fixed."""

    depth: int
    layers: tuple[int, ...]
    keep: tuple[float, ...]
    attention: tuple[float, ...]
    rho: tuple[float, ...]
    rebalance: tuple[bool, ...]
    selection: str
    score: str
    spatial: bool

    def average_share(self) -> float:
        """Layer-averaged share of N0 that the schedule keeps on its own depth."""
        ends = [*self.layers[1:], self.depth]
        return (self.layers[0] + sum((e - b) * k for b, e, k in zip(self.layers, ends, self.keep))) / self.depth


# LLaVA-1.5-7B (32 layers): 288, 144, 48, 0 of 576 at layers 3, 6, 14, 22, with the released code's recipes.
LLAVA = Schedule(32, (3, 6, 14, 22), (1 / 2, 1 / 4, 1 / 12, 0.0), (0.3, 0.9, 1.0, 0.0), (3.7, 1.5, 1.2, 1.0),
                 (True, True, True, False), "released", "logits", spatial=True)
# Qwen2.5-VL-7B (28 layers): N/2, N/4, N/8 at layers 3, 6, 15, keeping N/8 to the end (the paper's appendix; the
# released code's drop of every image token at 22 collapses text reading, BTP.md section 3); the paper's attention
# shares 0.2, 0.5, 0.8; from the released Qwen code: the softmax probabilities as scores, attention picks first and
# diversity seeded with them (no union), 1.2x candidates at the first and third stage and 1x at the second, the
# third rebalanced toward the first half of the span (its keep).
QWEN2_5_VL = Schedule(28, (3, 6, 15), (1 / 2, 1 / 4, 1 / 8), (0.2, 0.5, 0.8), (1.2, 1.0, 1.2), (False, False, True),
                      "exclusive", "probs", spatial=False)
SCHEDULES = {"qwen2_5_vl": QWEN2_5_VL}


def schedule(info: ModelInfo) -> Schedule:
    """The published schedule of `info`'s family (LLaVA-1.5's for families without their own)."""
    return SCHEDULES.get(info.family, LLAVA)


# PDrop: cuts at a quarter, half and three quarters of the depth, halving the image tokens each time.
_PDROP_DEPTH = (1 / 4, 1 / 2, 3 / 4)
_PDROP_KEEP = (1 / 2, 1 / 4, 1 / 8)


def share_of(keep: int, n0: int) -> float:
    """The smallest share (a multiple of 1/SHARE_UNIT) whose `share_count` at `n0` is at least `keep`: exactly
    `keep` unless `n0` exceeds SHARE_UNIT, where consecutive shares step over some counts."""
    return -(-keep * SHARE_UNIT // n0) / SHARE_UNIT


def _layers(fractions: list[float], num_layers: int) -> list[int]:
    """Depth fractions -> distinct first-reduced layers, each at least 1 and below `num_layers`."""
    out: list[int] = []
    for f in fractions:
        layer = max(1, _round(f * num_layers), (out[-1] + 1) if out else 1)
        if layer >= num_layers:
            raise PlanError(f"a model with {num_layers} layers is too shallow for this preset's "
                            f"{len(fractions)} stages")
        out.append(layer)
    return out


def with_shares(info: ModelInfo, stages: list[dict]) -> list[dict]:
    """`Stage` dicts as `info` needs them: on a dynamic family each with the `share` its nominal keep gives (and
    the keep that share gives back); unchanged otherwise."""
    if not info.dynamic:
        return stages
    n0 = info.image_tokens
    return [{**s, "share": (f := share_of(s["keep"], n0)), "keep": share_count(n0, f)} for s in stages]


def _plan(info: ModelInfo, stages: list[dict], method: str, score: str | None = None) -> Plan:
    """A validated preset plan, scored as the family's schedule says unless `score` is given; on a dynamic family
    each stage's `share` is the one its nominal keep gives."""
    score = score or schedule(info).score
    stages = with_shares(info, stages)
    try:
        return Plan(format=FORMAT, model=info, score=score, stages=tuple(Stage(**s) for s in stages),
                    calibration={"method": method})
    except ValidationError as err:
        raise PlanError(f"preset {method.removeprefix('preset:')!r} does not fit a model with {info.num_layers} "
                        f"layers and {info.image_tokens} image tokens: {_first_error(err)}") from err


def _btp_average(info: ModelInfo) -> float:
    """`btp`'s layer-averaged image tokens on this model, or the published share where `btp` does not fit."""
    try:
        return btp(info).average_image_tokens()
    except PlanError:
        return schedule(info).average_share() * info.image_tokens


def _btp_layers(info: ModelInfo) -> list[int]:
    sched = schedule(info)
    return _layers([x / sched.depth for x in sched.layers], info.num_layers)


def btp(info: ModelInfo, scale: float = 1.0) -> Plan:
    """The family's published schedule (`schedule(info)`) scaled to the model's depth; `scale` multiplies every
    stage's keep (spatial seeds stay half the first keep). Its `lambda`s are the shares its counts give (0.597,
    0.896, 1 on LLaVA-1.5)."""
    sched, n0 = schedule(info), info.image_tokens
    seeds = sched.spatial and info.grid[0] == info.grid[1] and not info.dynamic
    stages = []
    for i, layer in enumerate(_btp_layers(info)):
        keep = min(n0 - 1, _round(sched.keep[i] * n0 * scale))
        spatial = _round(keep / 2) if i == 0 and seeds else 0
        attention = min(math.floor(sched.attention[i] * keep), keep - spatial)
        alive = n0 if i == 0 else stages[-1]["keep"]
        # Candidate pools cannot exceed the tokens they rank: all of them at the released code's first stage,
        # those left after the seeds otherwise (only binds for scaled-up keeps).
        room = alive if i == 0 and sched.selection == "released" else alive - spatial
        rho = min(sched.rho[i], math.floor(100 * room / attention) / 100) if attention else sched.rho[i]
        stages.append({"layer": layer, "keep": keep, "spatial": spatial, "attention": attention, "rho": rho,
                       "rebalance": sched.rebalance[i] and attention > 0, "selection": sched.selection})
    return _plan(info, stages, "preset:btp")


def _scale_for(info: ModelInfo, layers: list[int], fractions: tuple[float, ...], share: float, name: str) -> float:
    """The factor on `fractions` (keep shares of N0 per stage at `layers`) that makes the layer-averaged image
    tokens `share * N0`; `PlanError` when the first keep would reach N0 or vanish."""
    n0, depth = info.image_tokens, info.num_layers
    ends = [*layers[1:], depth]
    unit = sum((end - layer) * k * n0 for layer, end, k in zip(layers, ends, fractions))  # tokens at scale 1
    scale = (share * n0 * depth - layers[0] * n0) / unit
    if not 0 < scale < 1 / fractions[0]:
        lo, hi = layers[0] / depth, (layers[0] * n0 + unit / fractions[0]) / (n0 * depth)
        raise PlanError(f"{name} at a layer-averaged share of {share:g} is out of reach on a model with {depth} "
                        f"layers (its first cut is layer {layers[0]}); expected a share in ({lo:.3f}, {hi:.3f})")
    return scale


def btp_budget(info: ModelInfo, share: float) -> Plan:
    """`btp`'s schedule with its keeps scaled so that the layer-averaged image tokens are `share * N0`
    (0.22 is the published 78% compression). Raises `PlanError` for a share the schedule cannot reach."""
    plan = _refit(btp(info, _scale_for(info, _btp_layers(info), schedule(info).keep, share, "btp")), share, "btp")
    return plan.model_copy(update={"calibration": {"method": f"preset:btp@{share:g}"}})


def token_tolerance(target: float) -> float:
    """How far a plan's layer-averaged image tokens may sit from a `target` of them: 2%, or half a token (an
    integer keep at layer 0 moves the average by whole tokens)."""
    return max(0.02 * target, 0.5)


def _refit(plan: Plan, share: float, name: str) -> Plan:
    """`plan` when its layer average is within `token_tolerance` of `share * N0`; else its keeps (as weights)
    solved jointly for it (`fit_keeps`), the recipes' shares kept. `PlanError` when even that misses."""
    info = plan.model
    target, depth, n0 = share * info.image_tokens, info.num_layers, info.image_tokens
    if abs(plan.average_image_tokens() - target) <= token_tolerance(target):
        return plan
    layers = [s.layer for s in plan.stages]
    keeps = fit_keeps(n0, layers, [s.keep for s in plan.stages], depth, lambda t: sum(t) / depth, target)
    got = sum(_layer_tokens(n0, layers, keeps, depth)) / depth
    if abs(got - target) > token_tolerance(target):
        raise PlanError(f"{name} at a layer-averaged share of {share:g} is out of reach on a model with {depth} "
                        f"layers: its nearest layer average is {got:.2f} image tokens, not {target:.2f}")
    stages, alive = [], n0
    for s, k in zip(plan.stages, keeps):
        spatial = min(s.spatial, _round(k / 2))
        attention = min(k - spatial, math.floor(s.attention * k / s.keep)) if s.keep else 0
        room = alive if s.selection == "released" and not stages else alive - spatial
        rho = min(s.rho, math.floor(100 * room / attention) / 100) if attention else s.rho
        stages.append(s.model_copy(update={"keep": k, "spatial": spatial, "attention": attention, "rho": rho}))
        alive = k
    return _plan(info, [x.model_dump(by_alias=True, exclude={"lambda_"}) for x in stages], f"preset:{name}",
                 plan.score)


def at_budget(name: str, info: ModelInfo, share: float) -> Plan:
    """Preset `name` (not `none`) at a layer-averaged image-token share `share` of N0: `btp` and `pdrop` scale
    their keeps, `fastv` and `divprune` solve their single keep. `PlanError` when the share is out of reach."""
    n0 = info.image_tokens
    target = share * n0
    if name == "btp":
        return btp_budget(info, share)
    if name == "pdrop":
        plan = _refit(pdrop(info, _scale_for(info, _layers(list(_PDROP_DEPTH), info.num_layers), _PDROP_KEEP,
                                             share, "pdrop")), share, "pdrop")
        return plan.model_copy(update={"calibration": {"method": f"preset:pdrop@{share:g}"}})
    elif name in ("fastv", "divprune"):
        layer = 0 if name == "divprune" else _fastv_layer(info)
        keep = last_keep(n0, [layer], [], info.num_layers, target)
        if not 0 < keep < n0:
            lo = layer / info.num_layers
            raise PlanError(f"{name} at a layer-averaged share of {share:g} is out of reach on a model with "
                            f"{info.num_layers} layers; expected a share in ({lo:.3f}, 1)")
        stages = [{"layer": layer, "keep": keep, **({"attention": keep} if name == "fastv" else {})}]
    else:
        raise PlanError(f"no budget form for plan {name!r}; expected one of btp, pdrop, fastv, divprune")
    plan = _plan(info, stages, f"preset:{name}")
    return plan.model_copy(update={"calibration": {"method": f"preset:{name}@{share:g}"}})


def _average_keep(info: ModelInfo, layer: int, target: float) -> int:
    """Keep count for one stage at `layer` that brings the layer average to `target` image tokens."""
    return max(0, min(info.image_tokens, last_keep(info.image_tokens, [layer], [], info.num_layers, target)))


def _fastv_layer(info: ModelInfo) -> int:
    return _layers([2 / 32], info.num_layers)[0]


def fastv(info: ModelInfo) -> Plan:
    layer = _fastv_layer(info)
    keep = _average_keep(info, layer, _btp_average(info))
    return _plan(info, [{"layer": layer, "keep": keep, "attention": keep}], "preset:fastv")


def pdrop(info: ModelInfo, scale: float | None = None, share: float | None = None) -> Plan:
    """PDrop's schedule: halving at each cut (`N0 // 2**i`), or with `scale` its keep shares scaled."""
    n0 = info.image_tokens
    layers = _layers(list(_PDROP_DEPTH), info.num_layers)
    keeps = ([n0 // 2 ** (i + 1) for i in range(len(layers))] if scale is None
             else [min(n0 - 1, _round(f * n0 * scale)) for f in _PDROP_KEEP])
    stages = [{"layer": layer, "keep": k, "attention": k} for layer, k in zip(layers, keeps)]
    plan = _plan(info, stages, "preset:pdrop")
    if share is not None:
        plan = plan.model_copy(update={"calibration": {"method": f"preset:pdrop@{share:g}"}})
    return plan


def divprune(info: ModelInfo) -> Plan:
    keep = _average_keep(info, 0, _btp_average(info))
    return _plan(info, [{"layer": 0, "keep": keep}], "preset:divprune")


def none(info: ModelInfo) -> Plan:
    return _plan(info, [], "preset:none")


PRESETS = {"none": none, "btp": btp, "fastv": fastv, "pdrop": pdrop, "divprune": divprune}


def model_info(model) -> ModelInfo:
    """The plan's `model` block for a `LoadedModel`."""
    return ModelInfo(family=model.family.name, num_layers=model.num_layers, image_tokens=model.image_tokens,
                     grid=model.grid, fingerprint=model.fingerprint, dynamic=getattr(model.family, "dynamic", False))


def resolve_plan(spec, model) -> Plan:
    """A `Plan`, a plan file path or a preset name -> a plan checked against `model` (a `LoadedModel`)."""
    info = model_info(model)
    if isinstance(spec, Plan):
        plan = spec
    elif isinstance(spec, str) and spec in PRESETS:
        plan = PRESETS[spec](info)
    elif isinstance(spec, os.PathLike) or (
        isinstance(spec, str) and (spec.lower().endswith(".json") or os.sep in spec or os.path.isfile(spec))
    ):
        plan = Plan.load(spec)
    else:
        raise PlanError(f"unknown plan {spec!r}: expected a plan file or one of the presets {', '.join(PRESETS)}")
    plan.check_model(info)
    return plan
