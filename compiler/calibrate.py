"""Calibration (BTP.md section 4): per-layer statistics of the unpruned model, the paper's boundary rule,
and a plan search against a token or FLOPs target that starts from the rule's plan.

Statistics come from the same `graphs` modules the reference runs, one decoder layer at a time: for every
layer, the number of image tokens whose hidden state turns by more than `tau` (cosine below it) and the
last prompt token's attention mass on the image span.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from btp.runtime import names
from btp.runtime.errors import InputError, PlanError

from .calibration_data import Sample
from .cost import decoder_flops
from .plan import FORMAT, Plan, Stage
from .presets import model_info, resolve_plan
from .reference import reference_pipeline
from .schedule import boundaries_from_drift, stage_keeps, stage_recipes

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


def _batches(samples: Sequence[Sample], size: int):
    for i in range(0, len(samples), size):
        yield samples[i : i + size]


def _prefill(pipe, batch: Sequence[Sample], observe):
    """`pipe.prefill` over `batch` with the observer; an `InputError` names the sample the model cannot take."""
    try:
        return pipe.prefill([s.image for s in batch], [s.prompt for s in batch], on_graph=observe)
    except InputError as err:
        for s in batch:  # the batch is small: find the sample
            try:
                pipe.prepare([s.image], [s.prompt])
            except InputError as one:
                raise InputError(f"{s.source}: {one}") from err
        raise


class _LayerStatistics:
    """An observer of the per-layer chain: for every stage graph (one decoder layer), the image tokens whose
    hidden state turns by more than `tau` and the last prompt token's attention mass on the image span."""

    def __init__(self, spec, tau: float):
        self.n0, self.tau, self.image_token_id = spec.image_tokens, tau, spec.image_token_id
        self.layer = {st.name: st.layers[0] for st in spec.stages}
        depth = len(self.layer)
        self.drift = torch.zeros(depth, dtype=torch.float64)
        self.mass = torch.zeros(depth, dtype=torch.float64)
        self.text_tokens = 0.0
        self.span = None

    def __call__(self, name: str, feeds: dict, outputs: dict) -> None:
        if name == names.EMBED:
            is_image = feeds[names.INPUT_IDS] == self.image_token_id
            start = torch.argmax(is_image.to(torch.int64), dim=1)
            self.span = start[:, None] + torch.arange(self.n0, device=start.device)[None, :]  # [B,N0]
            return
        if name not in self.layer:
            return
        i = self.layer[name]
        if i == 0:
            self.text_tokens += float((feeds[names.ATTENTION_MASK].sum(1) - self.n0).sum())
        rows = self.span[:, :, None].expand(-1, -1, feeds[names.INPUTS_EMBEDS].shape[2])
        before = feeds[names.INPUTS_EMBEDS].gather(1, rows).float()
        after = outputs[names.HIDDEN_STATES].gather(1, rows).float()
        similarity = torch.nn.functional.cosine_similarity(before, after, dim=-1)  # [B,N0]
        self.drift[i] += (similarity < self.tau).sum().item()
        self.mass[i] += outputs[names.SCORES].gather(1, self.span).sum().item()


@torch.inference_mode()
def collect_profile(model, samples: Sequence[Sample], tau: float = 0.93, batch_size: int = 8,
                    progress: Progress | None = None) -> Profile:
    """One unpruned prefill per sample through the per-layer reference chain (`reference_pipeline(per_layer=
    True)`), observed graph by graph -> mean drift count and attention mass per layer."""
    if not 0 < tau < 1:
        raise PlanError(f"must be in (0, 1), got {tau}", option="tau")
    pipe = reference_pipeline(model, "none", per_layer=True)
    stats = _LayerStatistics(pipe.spec, tau)
    done = 0
    for batch in _batches(samples, batch_size):
        _prefill(pipe, batch, stats)
        done += len(batch)
        if progress:
            progress(done, len(samples))
    return Profile(drift=(stats.drift / done).tolist(), attention=(stats.mass / done).tolist(), samples=done,
                   tau=tau, text_tokens=stats.text_tokens / done)


# ------------------------------------------------------------------------------------------------ plans
@dataclass(frozen=True)
class Genome:
    """The searched knobs of a schedule: boundaries, the budget ratio between stages, the attention share."""

    layers: tuple[int, ...]
    ratio: float = 0.5
    lambda_start: float = 0.6


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
        dicts = stage_recipes(keeps, layers, n0, info.grid[0] == info.grid[1], lambda_start=genome.lambda_start)
    except ValueError as err:
        raise PlanError(f"target {target.describe()} is out of reach with boundaries {layers} at any budget ratio "
                        f"0.05..0.95 (at ratio {genome.ratio:g}: {err})") from err
    return Plan(format=FORMAT, model=info, score="logits", stages=tuple(Stage(**d) for d in dicts),
                calibration=calibration)


def _keeps_for_target(n0: int, layers: list[int], depth: int, kwargs: dict) -> list[int]:
    """`stage_keeps` at the genome's ratio; when its target is out of reach there, at the nearest ratio
    (0.05..0.95) that reaches it, so that low or high targets still get the rule's boundaries."""
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
        raise first


def rule_genome(profile: Profile, stages: int = 4, lambda_start: float = 0.6) -> Genome:
    """The paper's rule: boundaries from the drift profile (`boundaries_from_drift`), ratio 0.5."""
    depth = len(profile.drift)
    if not 1 <= stages <= depth - 1:
        raise PlanError(f"must be 1 to {depth - 1} on a model with {depth} layers (a stage's first layer is 1 to "
                        f"{depth - 1}), got {stages}", option="stages")
    return Genome(tuple(boundaries_from_drift(profile.drift, stages)), 0.5, lambda_start)


def reachable_start(model, genome: Genome, target: Target, text_tokens: int, floor: int = 0) -> Genome:
    """`genome` when its plan meets `target`; else the same boundaries moved 1, 2, ... layers earlier (each
    stage's first layer at least its 1-based stage number) until one does. On a shallow model the rule's cuts
    can come too late for a low target: on 6 layers a 22% layer average needs the first cut at layer 1.
    PlanError (the original genome's) when not even the earliest boundaries reach it."""
    try:
        plan_from(model, genome, target, text_tokens, floor)
        return genome
    except PlanError as err:
        first = err
    layers = genome.layers
    for d in range(1, max(genome.layers)):
        layers = tuple(max(i + 1, b - d) for i, b in enumerate(genome.layers))
        moved = Genome(layers, genome.ratio, genome.lambda_start)
        try:
            plan_from(model, moved, target, text_tokens, floor)
            return moved
        except PlanError:
            if layers == tuple(range(1, len(layers) + 1)):
                break
    raise PlanError(f"{first}; moved back as far as {list(layers)} the boundaries still cannot reach it") from first


# ------------------------------------------------------------------------------------------------ distortion
@dataclass
class Reference:
    """Unpruned outputs per sample: last-position logits `[S,V]` and last-layer hidden states `[S,D]`."""

    logits: torch.Tensor
    hidden: torch.Tensor


def _run_outputs(model, plan: Plan, samples: Sequence[Sample], batch_size: int) -> Reference:
    pipe = reference_pipeline(model, plan)
    captured: list[torch.Tensor] = []

    def observe(name, feeds, _outputs):
        if name == names.HEAD:
            captured.append(feeds[names.HIDDEN_STATES][:, -1].float())

    logits = [_prefill(pipe, batch, observe).logits.float() for batch in _batches(samples, batch_size)]
    return Reference(torch.cat(logits), torch.cat(captured))


def reference_outputs(model, samples: Sequence[Sample], batch_size: int = 8) -> Reference:
    return _run_outputs(model, resolve_plan("none", model), samples, batch_size)


def distortion(model, plan: Plan, samples: Sequence[Sample], ref: Reference, batch_size: int = 8) -> dict:
    """Mean KL(unpruned || pruned) of the next-token distribution and mean cosine of the last-layer hidden
    state of the last prompt token, over `samples`."""
    out = _run_outputs(model, plan, samples, batch_size)
    p = torch.log_softmax(ref.logits, -1)
    q = torch.log_softmax(out.logits, -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    cos = torch.nn.functional.cosine_similarity(ref.hidden, out.hidden, dim=-1).mean().item()
    return {"kl": max(kl, 0.0), "cosine": cos}


def score(d: dict) -> float:
    """One number to minimise: KL plus the hidden-state cosine gap."""
    return d["kl"] + (1.0 - d["cosine"])


# ------------------------------------------------------------------------------------------------ search
@dataclass
class SearchResult:
    best: Genome
    plan: Plan
    distortion: dict
    evaluations: int
    history: list[tuple[Genome, float]] = field(default_factory=list)


def neighbours(g: Genome, depth: int) -> list[Genome]:
    """Moves of one knob: each boundary one layer either way, the stage ratio by 0.05, lambda by 0.1."""
    out = []
    for i in range(len(g.layers)):
        for step in (-1, 1):
            layers = list(g.layers)
            layers[i] += step
            if all(0 < a < b < depth for a, b in zip(layers, layers[1:])) and layers[0] > 0 and layers[-1] < depth:
                out.append(Genome(tuple(layers), g.ratio, g.lambda_start))
    for step in (-0.05, 0.05):
        r = round(g.ratio + step, 2)
        if 0.2 <= r <= 0.8:
            out.append(Genome(g.layers, r, g.lambda_start))
    for step in (-0.1, 0.1):
        lam = round(g.lambda_start + step, 2)
        if 0.0 <= lam <= 1.0:
            out.append(Genome(g.layers, g.ratio, lam))
    return out


def search(model, start: Genome, target: Target, text_tokens: int, samples: Sequence[Sample], ref: Reference,
           budget_evals: int = 24, floor: int = 0, batch_size: int = 8,
           progress: Progress | None = None) -> SearchResult:
    """First-improvement hill climbing from `start` under `target`; never returns a plan worse than `start`
    on `samples` (the start is evaluated first and only strict improvements are accepted)."""
    if budget_evals < 1:
        raise PlanError(f"must be >= 1, got {budget_evals}", option="budget_evals")
    depth = model.num_layers
    seen: dict[Genome, float] = {}
    plans: dict[Genome, tuple[Plan, dict]] = {}

    def evaluate(g: Genome) -> float:
        if g in seen:
            return seen[g]
        try:
            plan = plan_from(model, g, target, text_tokens, floor)
        except PlanError:
            seen[g] = math.inf
            return math.inf
        d = distortion(model, plan, samples, ref, batch_size)
        seen[g] = score(d)
        plans[g] = (plan, d)
        if progress:
            progress(len(plans), budget_evals)
        return seen[g]

    best, best_score = start, evaluate(start)
    if best_score == math.inf:
        raise PlanError("the rule's plan does not meet the target; nothing to search from")
    improved = True
    while improved and len(plans) < budget_evals:
        improved = False
        for g in neighbours(best, depth):
            if len(plans) >= budget_evals:
                break
            s = evaluate(g)
            if s < best_score - 1e-9:
                best, best_score, improved = g, s, True
                break
    plan, d = plans[best]
    return SearchResult(best, plan, d, len(plans), [(g, s) for g, s in seen.items() if s < math.inf])


# ------------------------------------------------------------------------------------------------ calibrate
Phase = Callable[[str, int, int], None]  # (phase, done, total): "statistics", "reference outputs", "search"


@dataclass
class Calibration:
    """What `calibrate` made. `plan`: the chosen plan, its `calibration` block the run's statistics (validated);
    `baseline`: the plan the distortion report compares it with, the rule's (`origin` "rule") or, when the rule's
    boundaries cannot reach the target and the search starts earlier, that start's ("start"); `report`: the
    distortion per plan name (`origin`, and "search"); `notes`: what a user should read (one line each)."""

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
              tau: float = 0.93, stages: int = 4, lambda_start: float = 0.6, keep_last: int | None = 0,
              budget_evals: int = 24, batch_size: int = 8, source: dict | None = None,
              progress: Phase | None = None) -> Calibration:
    """A plan for `model` from calibration `samples` (the last `heldout` share held out for the report): the
    paper's rule places the boundaries from the drift profile; `method` "search" then searches boundaries,
    budgets and attention shares for the least distortion under the same `target` (without one, at the rule's
    layer-averaged tokens). `keep_last` image tokens survive to the end (None: N0/16). `source` (where the samples
    came from) is recorded in the plan's `calibration` block. What `btp-calibrate` runs."""
    from .calibration_data import split

    if method not in ("drift", "search"):
        raise InputError(f"calibration method: expected 'drift' or 'search', got {method!r}")
    step = progress or (lambda phase, done, total: None)
    cal, held = split(list(samples), heldout)
    floor = max(1, model.image_tokens // 16) if keep_last is None else keep_last
    profile = collect_profile(model, cal, tau, batch_size, lambda d, t: step("statistics", d, t))
    text = round(profile.text_tokens)
    start = rule_genome(profile, stages, lambda_start)
    origin, notes = "rule", []
    if method == "search":
        # The search may move the boundaries; when the rule's are too late for the target, it starts from the
        # nearest earlier ones that reach it (the rule's plan is then not made).
        moved = reachable_start(model, start, target, text, floor)
        if moved != start:
            notes.append(f"the rule's boundaries {list(start.layers)} cannot reach {target.describe()}; the search "
                         f"starts from {list(moved.layers)}")
            log.info(notes[-1])
            origin, start = "start", moved
    baseline = plan_from(model, start, target, text, floor)
    step("reference outputs", 0, 2)
    ref_cal = reference_outputs(model, cal, batch_size)
    step("reference outputs", 1, 2)
    ref_held = reference_outputs(model, held, batch_size) if held else None
    step("reference outputs", 2, 2)
    report = {origin: _report(model, baseline, cal, held, ref_cal, ref_held, batch_size)}
    chosen = baseline
    if method == "search":
        # Without an explicit target the search keeps the rule's layer-averaged tokens: less distortion must not
        # come from simply keeping more tokens.
        goal = target if target.describe() else Target(tokens=baseline.average_image_tokens())
        found = search(model, start, goal, text, cal, ref_cal, budget_evals, floor, batch_size,
                       lambda d, t: step("search", d, t))
        chosen = found.plan
        report["search"] = _report(model, chosen, cal, held, ref_cal, ref_held, batch_size)
        report["search"]["evaluations"] = found.evaluations
        report["search"]["genome"] = {"ratio": found.best.ratio, "lambda_start": found.best.lambda_start}
    calibration = {
        "method": method, "samples": len(cal), "heldout": len(held), "tau": tau, **(source or {}),
        "target": target.describe(), "text_tokens": profile.text_tokens,
        "drift": [round(x, 3) for x in profile.drift], "attention": [round(x, 5) for x in profile.attention],
        "distortion": report,
    }
    plan = chosen.model_copy(update={"calibration": calibration})
    plan = Plan.parse(plan.model_dump(mode="json", by_alias=True, exclude_none=True))  # re-validated
    return Calibration(plan, baseline, origin, profile, report, notes)
