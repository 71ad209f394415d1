"""Calibration (BTP.md section 4): per-layer statistics of the unpruned model, the paper's boundary rule, and
`calibrate`, which makes the rule's plan or searches the plan space (`search.py`) from it and from the presets.

Statistics come from the same `graphs` modules the reference runs, one decoder layer at a time: for every
layer, the number of image tokens whose hidden state turns by more than `tau` (cosine below it), the last
prompt token's attention mass on the image span, and how concentrated that attention is (the share of its
image attention on its top N0/8 image tokens).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from btp.runtime import names
from btp.runtime.errors import InputError, PlanError

from .calibration_data import Sample
from .cost import decoder_flops
from .plan import FORMAT, Plan, Stage
from .presets import model_info, schedule, with_shares
from .reference import reference_pipeline
from .schedule import _layer_tokens, boundaries_from_drift, fit_keeps, focus_layer, stage_keeps, stage_recipes
from .search import Reference, batches, distortion, prefill, profile_start, reference_outputs, score, search
from .space import Target, budget_for, presets_at, realise

__all__ = ["Genome", "Profile", "Target", "Reference", "calibrate", "collect_profile", "distortion", "plan_from",
           "reachable_start", "reference_outputs", "rule_genome", "score", "search"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass
class Profile:
    """Per-layer calibration statistics averaged over samples (index = 0-based decoder layer)."""

    drift: list[float]
    attention: list[float]
    samples: int
    tau: float
    text_tokens: float
    concentration: list[float] = field(default_factory=list)  # top-N/8 share of the image attention
    image_tokens: int = 0
    uniform: float = 0.0  # the top-N/8 share a uniform attention gives, averaged over the images (0: at N0)

    def focus(self) -> int:
        """The layer from which the last prompt token's attention stays concentrated (`focus_layer`); 0 without
        a concentration profile."""
        if not self.concentration or not self.image_tokens:
            return 0
        uniform = self.uniform or max(1, self.image_tokens // 8) / self.image_tokens
        return focus_layer(self.concentration, uniform)


class _LayerStatistics:
    """An observer of the per-layer chain: for every stage graph (one decoder layer), the image tokens whose
    hidden state turns by more than `tau`, the last prompt token's attention mass on the image span and its share
    on the image's top N/8 tokens. Per image of N tokens, the drift is its share of N times the nominal N0 (a
    count at N0), so that images of different sizes (a family whose N follows the image's size) add up."""

    def __init__(self, spec, tau: float):
        self.n0, self.tau, self.image_token_id = spec.image_tokens, tau, spec.image_token_id
        self.layer = {st.name: st.layers[0] for st in spec.stages}
        depth = len(self.layer)
        self.drift = torch.zeros(depth, dtype=torch.float64)
        self.mass = torch.zeros(depth, dtype=torch.float64)
        self.peak = torch.zeros(depth, dtype=torch.float64)
        self.text_tokens = self.uniform = 0.0
        self.span, self.n = None, spec.image_tokens

    def __call__(self, name: str, feeds: dict, outputs: dict) -> None:
        if name == names.EMBED:
            is_image = feeds[names.INPUT_IDS] == self.image_token_id
            counts = is_image.sum(1)
            self.n = n = int(counts[0])
            if bool((counts != n).any()):
                raise InputError(f"expected one image size per calibration batch, got {counts.tolist()} image tokens")
            start = torch.argmax(is_image.to(torch.int64), dim=1)
            self.span = start[:, None] + torch.arange(n, device=start.device)[None, :]  # [B,N]
            self.uniform += len(counts) * max(1, n // 8) / n
            return
        if name not in self.layer:
            return
        i = self.layer[name]
        if i == 0:
            self.text_tokens += float((feeds[names.ATTENTION_MASK].sum(1) - self.n).sum())
        rows = self.span[:, :, None].expand(-1, -1, feeds[names.INPUTS_EMBEDS].shape[2])
        before = feeds[names.INPUTS_EMBEDS].gather(1, rows).float()
        after = outputs[names.HIDDEN_STATES].gather(1, rows).float()
        similarity = torch.nn.functional.cosine_similarity(before, after, dim=-1)  # [B,N]
        self.drift[i] += (similarity < self.tau).sum().item() * self.n0 / self.n
        image = outputs[names.SCORES].gather(1, self.span).double()  # [B,N]
        self.mass[i] += image.sum().item()
        share = image / image.sum(1, keepdim=True).clamp_min(1e-30)
        self.peak[i] += share.topk(max(1, self.n // 8), dim=1).values.sum().item()


@torch.inference_mode()
def collect_profile(model, samples: Sequence[Sample], tau: float = 0.93, batch_size: int = 8,
                    progress: Progress | None = None) -> Profile:
    """One unpruned prefill per sample through the per-layer reference chain (`reference_pipeline(per_layer=
    True)`), observed graph by graph -> mean drift count (at the nominal N0) and attention mass per layer. Images
    of a family whose image-token count follows the image's size are batched one size at a time."""
    if not 0 < tau < 1:
        raise PlanError(f"must be in (0, 1), got {tau}", option="tau")
    pipe = reference_pipeline(model, "none", per_layer=True)
    stats = _LayerStatistics(pipe.spec, tau)
    done = 0
    for batch in batches(samples, batch_size, pipe.plan.dynamic):
        prefill(pipe, batch, stats)
        done += len(batch)
        if progress:
            progress(done, len(samples))
    return Profile(drift=(stats.drift / done).tolist(), attention=(stats.mass / done).tolist(), samples=done,
                   tau=tau, text_tokens=stats.text_tokens / done, concentration=(stats.peak / done).tolist(),
                   image_tokens=model.image_tokens, uniform=stats.uniform / done)


# ------------------------------------------------------------------------------------------------ plans
@dataclass(frozen=True)
class Genome:
    """The rule's knobs: boundaries, the budget ratio between stages, the first stage's attention share, and the
    first layer whose stage may pick by attention (earlier ones are diversity-only: the attention has not yet
    concentrated on the image, `Profile.focus`)."""

    layers: tuple[int, ...]
    ratio: float = 0.5
    lambda_start: float = 0.6
    attention_from: int = 1


def plan_from(model, genome: Genome, target: Target, text_tokens: int, floor: int = 0,
              calibration: dict | None = None) -> Plan:
    """Budgets (last stage solved for `target`) and recipes for `genome` -> a validated plan."""
    info = model_info(model)
    n0, depth = info.image_tokens, info.num_layers
    layers = list(genome.layers)
    kwargs: dict = {"ratio": genome.ratio, "floor": floor}
    if target.tokens is not None or target.retention is not None:
        kwargs["target_tokens"] = target.tokens if target.tokens is not None else target.retention * n0
    elif target.flops is not None:
        d, m = model.hidden_size, model.intermediate_size
        full = Plan(format=FORMAT, model=info).flops(d, m, text_tokens)
        kwargs["cost"] = lambda per_layer: sum(decoder_flops(n + text_tokens, d, m) for n in per_layer)
        kwargs["target_cost"] = target.flops * full
    try:
        keeps = _keeps_for_target(n0, layers, depth, kwargs)
        square = info.grid[0] == info.grid[1] and not info.dynamic  # a dynamic family's grids vary: no seeds
        dicts = with_shares(info, stage_recipes(keeps, layers, n0, square, lambda_start=genome.lambda_start,
                                                attention_from=genome.attention_from))
    except ValueError as err:
        raise PlanError(f"target {target.describe()} is out of reach with boundaries {layers} at any budget ratio "
                        f"0.05..0.95 (at ratio {genome.ratio:g}: {err})") from err
    return Plan(format=FORMAT, model=info, score=schedule(info).score, stages=tuple(Stage(**d) for d in dicts),
                calibration=calibration)


def _keeps_for_target(n0: int, layers: list[int], depth: int, kwargs: dict) -> list[int]:
    """`stage_keeps` at the genome's ratio; when its target is out of reach there, at the nearest ratio
    (0.05..0.95) that reaches it, so that low or high targets still get the rule's boundaries; failing that, the
    ratio's keeps solved jointly (`fit_keeps`) when they land within 2%."""
    try:
        return stage_keeps(n0, layers, depth, **kwargs)
    except ValueError as first:
        if "target_tokens" not in kwargs and "target_cost" not in kwargs:
            raise
        ratio = kwargs["ratio"]
        for r in sorted((x / 100 for x in range(5, 96)), key=lambda x: (abs(x - ratio), x)):
            try:
                return stage_keeps(n0, layers, depth, **{**kwargs, "ratio": r})
            except ValueError:
                continue
        # no ratio puts the target inside the last keep's range: the keeps at this ratio solved jointly, when
        # that lands within 2% (a floor or integer keeps can leave the target just outside every range)
        measure = kwargs.get("cost") or (lambda per_layer: sum(per_layer) / depth)
        want = kwargs.get("target_cost", kwargs.get("target_tokens"))
        weights = [ratio ** (s + 1) for s in range(len(layers))]
        try:
            keeps = fit_keeps(n0, layers, weights, depth, measure, want, kwargs["floor"])
        except ValueError:
            raise first from None
        if abs(measure(_layer_tokens(n0, layers, keeps, depth)) - want) <= 0.02 * abs(want):
            return keeps
        raise first


def rule_genome(profile: Profile, stages: int = 4, lambda_start: float = 0.6) -> Genome:
    """The paper's rule: boundaries from the drift profile (`boundaries_from_drift`), ratio 0.5; stages whose
    scores come from before the focus layer pick by diversity only."""
    depth = len(profile.drift)
    if not 1 <= stages <= depth - 1:
        raise PlanError(f"must be 1 to {depth - 1} on a model with {depth} layers (a stage's first layer is 1 to "
                        f"{depth - 1}), got {stages}", option="stages")
    return Genome(tuple(boundaries_from_drift(profile.drift, stages)), 0.5, lambda_start, profile.focus() + 1)


def reachable_start(model, genome: Genome, target: Target, text_tokens: int, floor: int = 0) -> Genome:
    """`genome` when its plan meets `target`; else the same boundaries moved 1, 2, ... layers earlier (each
    stage's first layer at least its 0-based stage number: the first may reach layer 0, diversity-only there)
    until one does. On a shallow model the rule's cuts can come too late for a low target: on 6 layers a 22%
    layer average needs the first cut at layer 0 or 1.
    PlanError (the original genome's) when not even the earliest boundaries reach it."""
    try:
        plan_from(model, genome, target, text_tokens, floor)
        return genome
    except PlanError as err:
        first = err
    layers = genome.layers
    for d in range(1, max(genome.layers)):
        layers = tuple(max(i, b - d) for i, b in enumerate(genome.layers))
        moved = Genome(layers, genome.ratio, genome.lambda_start, genome.attention_from)
        try:
            plan_from(model, moved, target, text_tokens, floor)
            return moved
        except PlanError:
            if layers == tuple(range(len(layers))):
                break
    raise PlanError(f"{first}; moved back as far as {list(layers)} the boundaries still cannot reach it") from first


# ------------------------------------------------------------------------------------------------ calibrate
# (phase, done, total[, best distortion so far]): "statistics", "reference outputs", "search"
Phase = Callable[..., None]


@dataclass
class Calibration:
    """What `calibrate` made. `plan`: the chosen plan, its `calibration` block the run's statistics (validated);
    `baseline`: the plan the distortion report compares it with, the rule's (`origin` "rule"), or, when the rule's
    boundaries cannot reach the target, the same moved earlier ("start"), or where even that fails the search's
    best start (its name); `report`: the distortion per plan name (`origin`, and "search" with every start's
    calibration score); `notes`: what a user should read (one line each)."""

    plan: Plan
    baseline: Plan
    origin: str
    profile: Profile
    report: dict
    notes: list[str] = field(default_factory=list)


def _report(model, plan: Plan, cal, held, ref_cal: Reference, ref_held: Reference | None, batch_size: int) -> dict:
    out = {"layers": [s.layer for s in plan.stages], "keeps": [s.keep for s in plan.stages],
           "average_tokens": plan.average_image_tokens(),
           "calibration": distortion(model, plan, cal, ref_cal, batch_size)}
    if held:
        out["heldout"] = distortion(model, plan, held, ref_held, batch_size)
    return out


def calibrate(model, samples: Sequence[Sample], target: Target, method: str = "drift", heldout: float = 0.25,
              tau: float = 0.93, stages: int = 4, lambda_start: float = 0.6, keep_last: int | None = None,
              budget_evals: int = 40, batch_size: int = 8, source: dict | None = None,
              progress: Phase | None = None) -> Calibration:
    """A plan for `model` from calibration `samples` (the last `heldout` share held out for the report): the
    paper's rule places the boundaries from the drift profile; `method` "search" then searches the plan space
    (`search.search`) from the rule's plan, the profile's plan and every preset scaled to the same `target`
    (without one, the rule's layer-averaged tokens), so its plan is never worse than any of them on the calibration
    samples. `keep_last` image tokens survive to the end (None: N0/16; 0 lets the last stage drop them all).
    `source` (where the samples came from) is recorded in the plan's `calibration` block. What `btp-calibrate`
    runs."""
    from .calibration_data import split

    if method not in ("drift", "search"):
        raise InputError(f"calibration method: expected 'drift' or 'search', got {method!r}")
    step = progress or (lambda phase, done, total, best=None: None)
    cal, held = split(list(samples), heldout)
    floor = max(1, model.image_tokens // 16) if keep_last is None else keep_last
    if floor < 0:
        raise PlanError(f"must be >= 0, got {floor}", option="keep_last")
    profile = collect_profile(model, cal, tau, batch_size, lambda d, t: step("statistics", d, t))
    text = round(profile.text_tokens)
    start: Genome | None = rule_genome(profile, stages, lambda_start)
    origin, notes = "rule", []
    if method == "search":
        # When the rule's boundaries are too late for the target, its plan starts from the nearest earlier ones
        # that reach it; when none do, the search starts from the profile's plan and the presets alone.
        try:
            moved = reachable_start(model, start, target, text, floor)
        except PlanError as err:
            moved = None
            notes.append(f"the rule's plan cannot start the search: {err}")
        if moved is not None and moved != start:
            notes.append(f"the rule's boundaries {list(start.layers)} cannot reach {target.describe()}; its plan "
                         f"starts from {list(moved.layers)}")
            origin = "start"
        start = moved
        for note in notes:
            log.info(note)
    baseline = plan_from(model, start, target, text, floor) if start is not None else None
    step("reference outputs", 0, 2)
    ref_cal = reference_outputs(model, cal, batch_size)
    step("reference outputs", 1, 2)
    ref_held = reference_outputs(model, held, batch_size) if held else None
    step("reference outputs", 2, 2)
    chosen, report = baseline, {}
    if method == "search":
        found = _search(model, profile, target, text, baseline, origin, cal, ref_cal, budget_evals, floor,
                        batch_size, step)
        if baseline is None:  # the best start stands in for the rule's plan in the report
            origin = min(found.starts, key=found.starts.get)
            baseline = found.start_plans[origin]
        chosen = found.plan
        report["search"] = _report(model, chosen, cal, held, ref_cal, ref_held, batch_size)
        report["search"].update(evaluations=found.evaluations, origin=found.origin,
                                starts={k: round(v, 6) for k, v in found.starts.items()})
    report = {origin: _report(model, baseline, cal, held, ref_cal, ref_held, batch_size), **report}
    calibration = {
        "method": method, "samples": len(cal), "heldout": len(held), "tau": tau, **(source or {}),
        "target": target.describe(), "text_tokens": profile.text_tokens, "floor": floor,
        "drift": [round(x, 3) for x in profile.drift], "attention": [round(x, 5) for x in profile.attention],
        "concentration": [round(x, 4) for x in profile.concentration], "focus_layer": profile.focus(),
        "distortion": report,
    }
    plan = chosen.model_copy(update={"calibration": calibration})
    plan = Plan.parse(plan.model_dump(mode="json", by_alias=True, exclude_none=True))  # re-validated
    return Calibration(plan, baseline, origin, profile, report, notes)


def _search(model, profile: Profile, target: Target, text: int, baseline: Plan | None, origin: str, cal,
            ref_cal: Reference, budget_evals: int, floor: int, batch_size: int, step):
    """The search's starts (the rule's plan as `origin`, the profile's plan, every preset at the budget) and its
    result. Without a target the budget is the rule's tokens: less
    distortion must not come from simply keeping more tokens."""
    info = model_info(model)
    budget = budget_for(model, target, text, baseline.average_image_tokens() if baseline is not None else None)
    starts = {origin: baseline} if baseline is not None else {}
    with contextlib.suppress(PlanError):  # a profile plan out of reach of the budget is no start
        starts["profile"] = realise(info, profile_start(info.image_tokens, info.num_layers, profile.focus()),
                                    budget, floor)
    starts.update({f"preset:{k}": v for k, v in presets_at(info, budget).items()})
    return search(model, starts, budget, cal, ref_cal, budget_evals, floor, profile.focus(), batch_size,
                  lambda d, t, best: step("search", d, t, best))
