"""The plan space and the search (`compiler/space.py`, `compiler/search.py`): budgets met, plans valid, never
worse than a preset at the same budget."""

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from btp.compiler import Plan
from btp.compiler.calibrate import collect_profile, distortion, reference_outputs, score
from btp.compiler.calibration_data import builtin_samples
from btp.compiler.plan import ModelInfo
from btp.compiler.presets import at_budget, model_info, resolve_plan
from btp.compiler.search import neighbours, profile_start, search
from btp.compiler.space import Budget, StageSpec, Target, budget_for, presets_at, realise, specs_of
from btp.runtime.errors import PlanError

INFO = ModelInfo(family="llava", num_layers=6, image_tokens=81, grid=(9, 9), fingerprint="x")


@st.composite
def stage_specs(draw, depth=6):
    layers = sorted(draw(st.sets(st.integers(0, depth - 1), min_size=1, max_size=4)))
    weights = sorted((draw(st.floats(0.5, 80)) for _ in layers), reverse=True)
    return tuple(StageSpec(layer, w, draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])),
                           draw(st.sampled_from([0.0, 0.5])) if i == 0 else 0.0, draw(st.floats(1.0, 4.0)),
                           draw(st.booleans()), draw(st.sampled_from(["exclusive", "released"])))
                 for i, (layer, w) in enumerate(zip(layers, weights)))


@settings(max_examples=60, deadline=None)
@given(stage_specs(), st.floats(0.05, 0.9), st.integers(0, 6), st.booleans())
def test_realised_plans_meet_their_budget_and_validate(specs, share, floor, flops):
    """Any specs -> a plan within the budget's tolerance that survives a save/load round trip, or a PlanError."""
    budget = Budget(81, 6, share, True, 128, 256, 20) if flops else Budget(81, 6, share * 81)
    try:
        plan = realise(INFO, specs, budget, floor)
    except PlanError:
        return
    assert budget.meets(plan)
    assert Plan.parse(plan.to_json()) == plan
    assert [s.layer for s in plan.stages] == [s.layer for s in specs]
    assert plan.stages[-1].keep >= floor
    for spec, stage in zip(specs, plan.stages):
        assert stage.attention == 0 if spec.layer == 0 else True
        assert stage.lambda_ is None or stage.lambda_ == round(stage.attention / (stage.keep - stage.spatial), 6)
    # its moves stay in the space: every neighbour realises to a valid plan within the budget, or refuses
    for moved in neighbours(specs_of(plan), 6, focus=3)[:8]:
        with contextlib.suppress(PlanError):
            assert budget.meets(realise(INFO, moved, budget, floor))


def test_presets_are_points_of_the_space():
    """Every preset at a budget is read back as specs that realise to the same layout at that budget."""
    for name in ("btp", "fastv", "divprune"):
        plan = at_budget(name, INFO, 0.22)
        budget = Budget(81, 6, 0.22 * 81)
        again = realise(INFO, specs_of(plan), budget)
        assert budget.meets(plan) and budget.error(again) <= budget.error(plan)  # the joint solve lands nearer
        assert [s.layer for s in again.stages] == [s.layer for s in plan.stages]
        assert all(abs(a.keep - b.keep) <= 1 for a, b in zip(again.stages, plan.stages))
        assert [s.selection for s in again.stages] == [s.selection for s in plan.stages]
    found = presets_at(INFO, Budget(81, 6, 0.11 * 81))  # btp, fastv and pdrop cannot get that low on 6 layers
    assert set(found) == {"divprune"} and found["divprune"].stages[0].keep == 9
    # the profile's start: diversity at layer 0, attention right after the focus layer, 20 -> 13 at 22%
    plan = realise(INFO, profile_start(81, 6, focus=3), Budget(81, 6, 0.22 * 81), floor=5)
    assert [(s.layer, s.keep, s.attention) for s in plan.stages] == [(0, 20, 0), (4, 13, 13)]


@pytest.fixture(scope="module")
def calibration(tiny):
    samples = builtin_samples(4, seed=5)
    profile = collect_profile(tiny, samples, batch_size=4)
    return samples, reference_outputs(tiny, samples, 4), round(profile.text_tokens), profile.focus()


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(share=st.sampled_from([0.15, 0.22, 0.3, 0.45]), floor=st.sampled_from([0, 4]))
def test_search_meets_the_budget_and_beats_every_preset(tiny, calibration, share, floor):
    """The search's plan meets the budget, validates, and its calibration distortion is at most every preset's
    scaled to the same budget (they are among its starts; it accepts only improvements)."""
    samples, ref, text, focus = calibration
    info = model_info(tiny)
    budget = budget_for(tiny, Target(retention=share), text)
    presets = presets_at(info, budget)
    starts = dict(presets)
    with contextlib.suppress(PlanError):
        starts["profile"] = realise(info, profile_start(64, 8, focus), budget, floor)
    result = search(tiny, starts, budget, samples, ref, budget_evals=len(starts) + 3, floor=floor, focus=focus,
                    batch_size=4)
    assert budget.meets(result.plan) and Plan.parse(result.plan.to_json()) == result.plan
    assert result.evaluations <= len(starts) + 3
    for name, plan in presets.items():
        assert score(result.distortion) <= score(distortion(tiny, plan, samples, ref, 4)) + 1e-9, name


def test_candidates_share_the_unpruned_prefix(tiny, calibration):
    """With a memo, the vision graph and an unpruned first stage run once per batch across plans, and every plan's
    distortion is exactly what it is without one (btp and fastv both cut first at layer 1 on 8 layers)."""
    samples, ref, _, _ = calibration
    plans = [resolve_plan(name, tiny) for name in ("btp", "fastv", "divprune")]
    memo: dict = {}
    shared = [distortion(tiny, p, samples, ref, 2, memo) for p in plans]
    assert shared == [distortion(tiny, p, samples, ref, 2) for p in plans]
    batches = len(samples) // 2
    assert len(memo) == 2 * batches  # vision per batch, and layer 0 once for btp and fastv together
