"""The distortion a plan causes on calibration samples, and the search over the plan space (`space.py`) that
lowers it under a budget: `btp-calibrate --method search`.

The search evaluates its starts (the rule's plan, the profile's diversity-then-attention plan and every preset
scaled to the budget), then climbs from the best one (then the next), one move at a time, accepting only a plan
with less distortion. It returns the best plan it evaluated: never worse on the calibration samples than any
start.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from btp.runtime import names
from btp.runtime.errors import InputError, PlanError

from .calibration_data import Sample
from .plan import Plan
from .presets import resolve_plan
from .reference import reference_pipeline
from .space import Budget, StageSpec, realise, specs_of

log = logging.getLogger(__name__)

SearchProgress = Callable[[int, int, float], None]  # (evaluations, budget, best score so far)


def batches(samples: Sequence[Sample], size: int, by_size: bool = False):
    """Consecutive batches of `size` samples; `by_size`: of images of one size only (a family whose image-token
    count follows the image's size batches one size at a time), the sizes in order of first appearance."""
    if not by_size:
        for i in range(0, len(samples), size):
            yield samples[i : i + size]
        return
    groups: dict[tuple[int, int], list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.image.size, []).append(s)
    for group in groups.values():
        yield from batches(group, size)


def prefill(pipe, batch: Sequence[Sample], observe):
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


# ------------------------------------------------------------------------------------------------ distortion
@dataclass
class Reference:
    """Unpruned outputs per sample: last-position logits `[S,V]` and last-layer hidden states `[S,D]`."""

    logits: torch.Tensor
    hidden: torch.Tensor


class _Memo:
    """An engine that answers from `store` what a graph of the same kind computed before on the same feeds: the
    vision graph and the unpruned first stage (layers from 0, every image token), which every candidate plan with
    the same first cut shares, so that candidate evaluations skip them."""

    def __init__(self, engine, kind: tuple, store: dict):
        self.engine, self.kind, self.store = engine, kind, store
        self.name, self.input_names, self.output_names = engine.name, engine.input_names, engine.output_names

    def run(self, feeds: dict) -> dict:
        digest = hashlib.sha1()
        for n in self.input_names:
            t = feeds[n].detach().contiguous().cpu()
            digest.update(f"{n}{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        key = (*self.kind, digest.hexdigest())
        if key not in self.store:
            self.store[key] = self.engine.run(feeds)
        return dict(self.store[key])


def _memoise(pipe, store: dict) -> None:
    """Wrap `pipe`'s shared graphs (vision, the unpruned first stage) in `_Memo`s over `store`."""
    pipe.engines[names.VISION] = _Memo(pipe.engines[names.VISION], (names.VISION,), store)
    first = pipe.spec.stages[0]
    if first.prune is None and first.image_tokens == pipe.spec.image_tokens:
        module = pipe.engines[first.name].module
        kind = ("stage", first.layers, module.score_mode, module.final)
        pipe.engines[first.name] = _Memo(pipe.engines[first.name], kind, store)


def _run_outputs(model, plan: Plan, samples: Sequence[Sample], batch_size: int,
                 memo: dict | None = None) -> Reference:
    pipe = reference_pipeline(model, plan)
    if memo is not None:
        _memoise(pipe, memo)
    captured: list[torch.Tensor] = []

    def observe(name, feeds, _outputs):
        if name == names.HEAD:
            captured.append(feeds[names.HIDDEN_STATES][:, -1].float())

    by_size = pipe.plan.dynamic
    logits = [prefill(pipe, batch, observe).logits.float() for batch in batches(samples, batch_size, by_size)]
    return Reference(torch.cat(logits), torch.cat(captured))


def reference_outputs(model, samples: Sequence[Sample], batch_size: int = 8) -> Reference:
    return _run_outputs(model, resolve_plan("none", model), samples, batch_size)


def distortion(model, plan: Plan, samples: Sequence[Sample], ref: Reference, batch_size: int = 8,
               memo: dict | None = None) -> dict:
    """Mean KL(unpruned || pruned) of the next-token distribution and mean cosine of the last-layer hidden
    state of the last prompt token, over `samples`. `memo` (a dict kept across calls on the same samples) holds
    the outputs of the graphs plans share, the vision graph and an unpruned first stage, computed once."""
    out = _run_outputs(model, plan, samples, batch_size, memo)
    p = torch.log_softmax(ref.logits, -1)
    q = torch.log_softmax(out.logits, -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    cos = torch.nn.functional.cosine_similarity(ref.hidden, out.hidden, dim=-1).mean().item()
    return {"kl": max(kl, 0.0), "cosine": cos}


def score(d: dict) -> float:
    """One number to minimise: KL plus the hidden-state cosine gap."""
    return d["kl"] + (1.0 - d["cosine"])


# ------------------------------------------------------------------------------------------------ moves
def neighbours(specs: tuple[StageSpec, ...], depth: int, focus: int) -> list[tuple[StageSpec, ...]]:
    """One-knob moves: a boundary one layer either way (layer 0 included: diversity only there), one stage's
    keep weight x1.3 or /1.3 (the budget re-solves all keeps jointly), its attention share to 0 first where its
    scores come from before `focus` (the layer the attention concentrates from), else by 0.25 either way,
    a layer-0 diversity stage added, a stage appended at any later layer, a stage dropped, a stage split, a
    dropped-to-0 last stage given a floor."""
    out: list[tuple[StageSpec, ...]] = []
    n = len(specs)
    for i, s in enumerate(specs):
        for step in (-1, 1):
            layer = s.layer + step
            prev = specs[i - 1].layer if i else -1
            nxt = specs[i + 1].layer if i + 1 < n else depth
            if prev < layer < nxt:
                moved = replace(s, layer=layer, share=0.0 if layer == 0 else (s.share or 1.0))
                out.append((*specs[:i], moved, *specs[i + 1 :]))
    for i, s in enumerate(specs):
        if s.weight > 0:
            out += [(*specs[:i], replace(s, weight=s.weight * f), *specs[i + 1 :]) for f in (1.3, 1 / 1.3)]
    for i, s in enumerate(specs):
        if s.layer == 0 or s.weight <= 0:
            continue
        shares = [0.0] if s.layer - 1 < focus and s.share > 0 else []
        shares += [x for x in (s.share - 0.25, s.share + 0.25) if 0 <= x <= 1 and x not in shares]
        out += [(*specs[:i], replace(s, share=round(x, 4)), *specs[i + 1 :]) for x in shares]
    if specs[0].layer > 0:
        out.append((StageSpec(0, specs[0].weight * 1.5, 0.0), *specs))
    last = specs[-1]
    if last.weight > 0:  # a later stage, by attention once it has concentrated
        out += [(*specs, StageSpec(layer, last.weight / 1.5, 1.0 if layer - 1 >= focus else 0.0))
                for layer in range(last.layer + 1, depth)]
    if n > 1:
        out += [specs[:i] + specs[i + 1 :] for i in range(n)]
    for i in range(n - 1):
        a, b = specs[i], specs[i + 1]
        if b.layer - a.layer > 1 and b.weight > 0:
            mid = StageSpec((a.layer + b.layer) // 2, math.sqrt(a.weight * b.weight), b.share)
            out.append((*specs[: i + 1], mid, *specs[i + 1 :]))
    if specs[-1].weight <= 0:
        out.append((*specs[:-1], replace(specs[-1], weight=1.0, share=1.0)))
    return out


def profile_start(n0: int, depth: int, focus: int) -> tuple[StageSpec, ...]:
    """Diversity first, attention once it concentrates: a layer-0 diversity stage and an attention stage right
    after the focus layer (when there is one before the last layer), keeps in the ratio 3:2."""
    if not 0 <= focus < depth - 1:
        return (StageSpec(0, n0 / 4, 0.0),)
    return (StageSpec(0, 3.0, 0.0), StageSpec(focus + 1, 2.0, 1.0))


# ------------------------------------------------------------------------------------------------ search
@dataclass
class SearchResult:
    """The best plan found, its distortion, where it came from (a start's name, `+` the moves since) and the
    calibration score of every start and evaluated plan."""

    plan: Plan
    distortion: dict
    evaluations: int
    origin: str
    starts: dict[str, float] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)
    start_plans: dict[str, Plan] = field(default_factory=dict)


def search(model, starts: dict[str, Plan], budget: Budget, samples: Sequence[Sample], ref: Reference,
           budget_evals: int = 40, floor: int = 0, focus: int = 0, batch_size: int = 8,
           progress: SearchProgress | None = None) -> SearchResult:
    """Evaluate every start that meets `budget`, then first-improvement hill climbing over `neighbours` from the
    best start, then (evaluations left) from the next best, within `budget_evals` evaluations (starts included, at
    least every start); only plans meeting `budget` are evaluated, a climb accepts only strictly lower distortion,
    and the best plan evaluated is returned."""
    if budget_evals < 1:
        raise PlanError(f"must be >= 1, got {budget_evals}", option="budget_evals")
    info = next(iter(starts.values())).model if starts else None
    seen: dict[tuple, float] = {}
    results: dict[tuple, tuple[Plan, dict]] = {}
    history: list[float] = []
    best: dict = {"score": math.inf}
    total = max(budget_evals, len(starts))
    memo: dict = {}  # the shared prefix of every candidate's chain, per batch

    def evaluate(plan: Plan, name: str) -> float:
        key = plan.stages
        if key not in seen:
            d = distortion(model, plan, samples, ref, batch_size, memo)
            seen[key], results[key] = score(d), (plan, d)
            history.append(seen[key])
            if seen[key] < best["score"] - 1e-9:
                best.update(score=seen[key], key=key, origin=name)
            if progress:
                progress(len(results), total, best["score"])
        return seen[key]

    start_scores = {name: evaluate(p, name) for name, p in starts.items() if budget.meets(p)}
    if not start_scores:
        raise PlanError(f"no start meets the budget {budget.value:g}; nothing to search from")
    # climb from the best start; at a local optimum with evaluations left, from the next best start
    for name in sorted(start_scores, key=start_scores.get):
        key, improved = starts[name].stages, True
        while improved and len(results) < budget_evals:
            improved = False
            for specs in neighbours(specs_of(results[key][0]), budget.depth, focus):
                if len(results) >= budget_evals:
                    break
                if floor and specs[-1].weight <= 0:
                    continue  # a floor survives to the end: no new plan drops every image token
                try:
                    cand = realise(info, specs, budget, floor)
                except PlanError:
                    continue
                if evaluate(cand, f"{name}+search") < seen[key] - 1e-9:
                    key, improved = cand.stages, True
                    break
    plan, d = results[best["key"]]
    log.info("search: %d plans, best %.5f from %s", len(results), best["score"], best["origin"])
    return SearchResult(plan, d, len(results), best["origin"], start_scores, history,
                        {name: starts[name] for name in start_scores})
