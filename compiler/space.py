"""The plan space of `btp-calibrate --method search`: budgets, stage specs and their plans.

A plan is a list of `StageSpec`s: where a stage cuts, a relative keep (`weight`), the attention share of its
non-spatial picks and its recipe knobs. `realise` solves every keep jointly for a `Budget` (`fit_keeps`) and
turns the specs into a validated `Plan`; `specs_of` reads them back from any plan, so the presets, the rule's plan
and a layer-0 diversity stage followed by attention stages are all points of the same space.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from btp.runtime.errors import PlanError

from .cost import decoder_flops
from .plan import FORMAT, ModelInfo, Plan, Stage, _first_error
from .presets import PRESETS, at_budget, schedule, token_tolerance, with_shares
from .schedule import _layer_tokens, _round, fit_keeps

_EPS = 1e-9


@dataclass(frozen=True)
class Target:
    """What the schedule must meet: layer-averaged image `tokens`, a `retention` share of them, or a
    `flops` share of the unpruned decoder FLOPs. At most one is set; none keeps the published schedule."""

    tokens: float | None = None
    retention: float | None = None
    flops: float | None = None

    def __post_init__(self):
        if sum(v is not None for v in (self.tokens, self.retention, self.flops)) > 1:
            raise PlanError(f"expected at most one target of tokens, retention and flops, got {self.describe()}")
        for name in ("retention", "flops"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= 1:
                raise PlanError(f"must be a fraction in (0, 1], got {v}", option=name)
        if self.tokens is not None and self.tokens < 0:
            raise PlanError(f"must be >= 0, got {self.tokens}", option="tokens")

    def describe(self) -> dict:
        return {k: v for k, v in (("tokens", self.tokens), ("retention", self.retention), ("flops", self.flops))
                if v is not None}


@dataclass(frozen=True)
class Budget:
    """A `Target` on one model: `measure(per_layer_tokens)` (layer-averaged image tokens, or the decoder FLOPs
    share with `text_tokens` text tokens) must land within `tolerance` of `value`."""

    n0: int
    depth: int
    value: float
    flops: bool = False
    hidden: int = 0
    intermediate: int = 0
    text_tokens: int = 0

    def measure(self, per_layer: Sequence[int]) -> float:
        """`[depth]` image tokens alive per layer -> the budget's measure."""
        if not self.flops:
            return sum(per_layer) / self.depth
        cost = sum(decoder_flops(n + self.text_tokens, self.hidden, self.intermediate) for n in per_layer)
        return cost / self._full()

    def _full(self) -> float:
        return self.depth * decoder_flops(self.n0 + self.text_tokens, self.hidden, self.intermediate)

    @property
    def tolerance(self) -> float:
        """2% of the value, or what half a layer-averaged image token moves the measure (integer keeps)."""
        if not self.flops:
            return token_tolerance(self.value)
        half = (self.measure([self.n0] * self.depth) - self.measure([0] * self.depth)) / (2 * self.n0)
        return max(0.02 * self.value, half)

    def error(self, plan: Plan) -> float:
        return abs(self.measure(plan.layer_tokens()) - self.value)

    def meets(self, plan: Plan) -> bool:
        return self.error(plan) <= self.tolerance + _EPS

    def share(self) -> float | None:
        """The layer-averaged image-token share of N0 (token budgets), None for FLOPs budgets."""
        return None if self.flops else self.value / self.n0


def budget_for(model, target: Target, text_tokens: int = 0, fallback_tokens: float | None = None) -> Budget:
    """`target` on `model` (a `LoadedModel`); a target without a value takes `fallback_tokens`."""
    n0, depth = model.image_tokens, model.num_layers
    if target.flops is not None:
        return Budget(n0, depth, target.flops, True, model.hidden_size, model.intermediate_size, text_tokens)
    if target.tokens is not None:
        return Budget(n0, depth, target.tokens)
    if target.retention is not None:
        return Budget(n0, depth, target.retention * n0)
    if fallback_tokens is None:
        raise PlanError("expected a target (tokens, retention or flops) to search under")
    return Budget(n0, depth, fallback_tokens)


@dataclass(frozen=True)
class StageSpec:
    """One stage of the search space: cut before `layer`, relative keep `weight` (0 keeps none), attention
    `share` of the non-spatial picks (0 at layer 0), `spatial` share of the keep (first stage, square grids)."""

    layer: int
    weight: float
    share: float = 1.0
    spatial: float = 0.0
    rho: float = 1.5
    rebalance: bool = True
    selection: str = "exclusive"


def specs_of(plan: Plan) -> tuple[StageSpec, ...]:
    """A plan's stages as search-space specs (its keeps as weights)."""
    return tuple(StageSpec(s.layer, float(s.keep), s.attention / (s.keep - s.spatial) if s.keep > s.spatial else 0.0,
                           s.spatial / s.keep if s.keep else 0.0, s.rho, s.rebalance or s.attention == 0, s.selection)
                 for s in plan.stages)


def realise(info: ModelInfo, specs: Sequence[StageSpec], budget: Budget, floor: int = 0,
            calibration: dict | None = None) -> Plan:
    """Specs -> a validated plan whose keeps are solved jointly for `budget` (`fit_keeps`); `PlanError` when the
    specs cannot meet it within its tolerance or make no valid plan. On a dynamic family (keeps as shares of the
    image's tokens) no spatial seeds, and the keeps are those at the nominal `N0`."""
    n0, depth = info.image_tokens, info.num_layers
    square = info.grid[0] == info.grid[1] and not info.dynamic
    layers = [s.layer for s in specs]
    try:
        keeps = fit_keeps(n0, layers, [s.weight for s in specs], depth, budget.measure, budget.value, floor)
    except ValueError as err:
        raise PlanError(f"stages at layers {layers}: {err}") from err
    got = budget.measure(_layer_tokens(n0, layers, keeps, depth))
    if abs(got - budget.value) > budget.tolerance + _EPS:
        raise PlanError(f"stages at layers {layers} cannot meet the budget {budget.value:g} (nearest {got:g})")
    stages, alive = [], n0
    for i, (spec, keep) in enumerate(zip(specs, keeps)):
        spatial = min(keep, _round(spec.spatial * keep)) if i == 0 and square and keep else 0
        attention = 0 if spec.layer == 0 or not keep else math.floor(spec.share * (keep - spatial) + _EPS)
        room = alive if spec.selection == "released" and i == 0 else alive - spatial
        rho = max(1.0, spec.rho)
        if attention and math.ceil(rho * attention - _EPS) > room:
            rho = max(1.0, math.floor(room / attention * 1e4) / 1e4)
        stages.append({"layer": spec.layer, "keep": keep, "spatial": spatial, "attention": attention,
                       "rho": rho if attention else 1.0, "rebalance": bool(attention) and spec.rebalance,
                       "selection": spec.selection})
        alive = keep
    try:
        return Plan(format=FORMAT, model=info, score=schedule(info).score,
                    stages=tuple(Stage(**s) for s in with_shares(info, stages)), calibration=calibration)
    except ValidationError as err:
        raise PlanError(f"stages at layers {layers}: {_first_error(err)}") from err


def presets_at(info: ModelInfo, budget: Budget) -> dict[str, Plan]:
    """Every preset but `none` scaled to `budget`: `at_budget` for token budgets where it lands within the
    tolerance, else the preset's own stages with their keeps solved for it (`realise`); presets that cannot
    reach it are left out."""
    out = {}
    for name in PRESETS:
        if name == "none":
            continue
        plan = None
        share = budget.share()
        if share is not None:
            try:
                plan = at_budget(name, info, share)
            except PlanError:
                plan = None
        if plan is None or not budget.meets(plan):
            try:
                plan = realise(info, specs_of(PRESETS[name](info)), budget, 0, {"method": f"preset:{name}"})
            except PlanError:
                continue
        out[name] = plan
    return out
