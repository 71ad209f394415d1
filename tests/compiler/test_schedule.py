"""The calibration rule: drift profile -> boundaries -> budgets -> recipes that validate as a Plan (BTP.md 3-5)."""

import math
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from btp.compiler.cost import decoder_flops
from btp.compiler.plan import FORMAT, ModelInfo, Plan, Stage
from btp.compiler.schedule import (
    boundaries_from_drift,
    fit_keeps,
    focus_layer,
    interpolate_profile,
    major_shifts,
    stage_keeps,
    stage_recipes,
)

# The paper's LLaVA-1.5-7B drift counts at 1-based layers; boundaries chosen: before 1-based 4, 7, 15, 23.
PAPER = {1: 0, 5: 0, 9: 325, 13: 141, 17: 155, 21: 45, 25: 1}
LLAVA7B = ModelInfo(family="llava", num_layers=32, image_tokens=576, grid=(24, 24), fingerprint="llava-7b")
TINY = ModelInfo(family="llava", num_layers=8, image_tokens=64, grid=(8, 8), fingerprint="tiny-fp")


def plan(info, dicts):
    return Plan(format=FORMAT, model=info, stages=tuple(Stage(**d) for d in dicts))


def strictly_inside(b, runs):
    return any(s < b <= e for s, e in runs)


def check_boundaries(drift, stages=4):
    out = boundaries_from_drift(drift, stages)
    assert len(out) == stages
    assert all(b > a for a, b in pairwise(out)), out
    assert all(1 <= b <= len(drift) - 1 for b in out), out
    assert boundaries_from_drift(list(drift), stages) == out  # deterministic
    return out


# --------------------------------------------------------------------------------------------- profiles
def test_interpolate_paper_profile():
    d = interpolate_profile(PAPER, 32)
    assert len(d) == 32
    assert d[:5] == [0.0] * 5  # 1-based 1..5
    assert d[8] == 325.0 and d[12] == 141.0 and d[16] == 155.0 and d[24] == 1.0  # the given points
    assert d[5] == pytest.approx(81.25) and d[9] == pytest.approx(279.0) and d[21] == pytest.approx(34.0)
    assert d[25:] == [1.0] * 7  # last value after the last point


def test_interpolate_extends_constant_and_checks_input():
    assert interpolate_profile({3: 2.0, 5: 4.0}, 6) == [2.0, 2.0, 2.0, 3.0, 4.0, 4.0]
    assert interpolate_profile({4: 7}, 3) == [7.0, 7.0, 7.0]
    with pytest.raises(ValueError, match="no points"):
        interpolate_profile({}, 4)
    with pytest.raises(ValueError, match="num_layers"):
        interpolate_profile({1: 0}, 0)


def test_major_shifts():
    d = interpolate_profile(PAPER, 32)
    assert major_shifts(d) == [(6, 11), (14, 16)]  # threshold 0.45 * 325 = 146.25
    assert major_shifts(d, level=0.9) == [(8, 8)]
    assert major_shifts([0.0] * 8) == []
    assert major_shifts([]) == []
    assert major_shifts([5, 0, 5, 5, 0, 5]) == [(0, 0), (2, 3), (5, 5)]


# --------------------------------------------------------------------------------------------- boundaries
def test_paper_profile_gives_published_boundaries():
    d = interpolate_profile(PAPER, 32)
    out = check_boundaries(d)
    assert all(abs(a - b) <= 1 for a, b in zip(out, (3, 6, 14, 22)))  # the required tolerance
    assert out == [3, 6, 14, 22]  # and the rule hits it exactly
    assert not any(strictly_inside(b, major_shifts(d)) for b in out)


FLAT = [[0.0] * 32, [7.0] * 32, [100.0 + (i % 2) for i in range(32)]]


@pytest.mark.parametrize("drift", FLAT, ids=["zero", "constant", "nearly-flat"])
def test_flat_profile_uses_depth_fractions(drift):
    assert check_boundaries(drift) == [3, 6, 14, 22]


def test_flat_profile_scales_with_depth():
    assert check_boundaries([0.0] * 28) == [3, 5, 12, 19]  # 2.625, 5.25, 12.25, 19.25 rounded half up
    assert check_boundaries([0.0] * 5) == [1, 2, 3, 4]  # bumped to stay distinct
    with pytest.raises(ValueError, match="cannot hold 4 boundaries"):
        boundaries_from_drift([0.0] * 4)


def test_single_peak():
    d = interpolate_profile({1: 0, 8: 0, 12: 100, 16: 0}, 32)
    runs = major_shifts(d)
    assert runs == [(9, 13)]
    out = check_boundaries(d)
    assert out == [5, 9, 14, 15]  # the mid cut 12 sat inside the shift and moved to its end+1
    assert out[1] == runs[0][0] and out[3] == 15 and d[15] < 10
    assert not any(strictly_inside(b, runs) for b in out)


def test_two_peaks():
    d = interpolate_profile({1: 0, 6: 0, 9: 200, 12: 20, 18: 20, 21: 150, 24: 0}, 32)
    runs = major_shifts(d)
    assert runs == [(7, 9), (19, 21)]
    out = check_boundaries(d)
    assert out == [4, 7, 15, 23]  # before the first shift; die-out after the second one
    assert not any(strictly_inside(b, runs) for b in out)


def test_other_stage_counts():
    d = interpolate_profile(PAPER, 32)
    assert check_boundaries(d, 1) == [22]
    assert check_boundaries(d, 2) == [6, 22]
    assert check_boundaries(d, 3) == [3, 6, 22]
    assert check_boundaries(d, 6) == [2, 4, 6, 12, 17, 22]
    for s in (1, 2, 3, 5, 6):
        assert not any(strictly_inside(b, major_shifts(d)) for b in check_boundaries(d, s))
    with pytest.raises(ValueError, match="at least 1"):
        boundaries_from_drift(d, 0)


def test_shift_in_the_last_layer_packs_the_cuts_back():
    """The trained 6-layer toy-vlm: its image tokens drift (cosine < 0.93) in the last layer only."""
    d = [0.0, 0.0, 1.0, 0.3, 0.6, 3.1]
    assert major_shifts(d) == [(5, 5)]
    assert check_boundaries(d) == [2, 3, 4, 5]  # the rule's 3, 5, 5, 5 bumped past layer 5, then packed back
    assert check_boundaries(d, 2) == [4, 5] and check_boundaries(d, 1) == [5]
    assert check_boundaries(d, 5) == [1, 2, 3, 4, 5]


def test_shift_at_the_very_start_is_skipped():
    d = [100.0] * 4 + [0.0] * 12
    runs = major_shifts(d)
    assert runs == [(0, 3)]
    out = check_boundaries(d)
    assert out[0] == 4 and not any(strictly_inside(b, runs) for b in out)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 100), min_size=6, max_size=48), st.integers(1, 5))
def test_boundaries_properties(values, stages):
    drift = [float(v) for v in values]
    out = check_boundaries(drift, stages)  # at least 6 layers hold 5 cuts: the rule always places them
    runs = major_shifts(drift)
    flat = max(drift) <= 0 or max(drift) - min(drift) <= 0.05 * max(drift)
    free = [b for b in range(1, len(drift)) if not strictly_inside(b, runs)]
    if not flat and all(e + 1 <= len(drift) - 1 for _, e in runs) and len(free) >= stages:
        assert not any(strictly_inside(b, runs) for b in out), (out, runs)


# --------------------------------------------------------------------------------------------- keeps
def avg_tokens(n0, layers, keeps, depth):
    counts, alive = [], n0
    for layer in range(depth):
        if layer in layers:
            alive = keeps[layers.index(layer)]
        counts.append(alive)
    return sum(counts) / depth, counts


def test_keeps_default_and_floor():
    assert stage_keeps(576, [3, 6, 14, 22], 32) == [288, 144, 72, 0]
    assert stage_keeps(576, [3, 6, 14, 22], 32, floor=40) == [288, 144, 72, 40]
    assert stage_keeps(576, [3, 6, 14], 32, ratio=0.25) == [144, 36, 0]
    assert stage_keeps(64, [2], 8) == [0]
    with pytest.raises(ValueError, match="strictly decreasing"):
        stage_keeps(4, [1, 2, 3, 4], 8)
    with pytest.raises(ValueError, match="strictly decreasing"):
        stage_keeps(576, [3, 6, 14, 22], 32, floor=72)
    with pytest.raises(ValueError, match="strictly increasing"):
        stage_keeps(576, [6, 3], 32)
    with pytest.raises(ValueError, match="ratio"):
        stage_keeps(576, [3, 6], 32, ratio=1.0)


def test_keeps_solve_target_tokens():
    layers = [3, 6, 14, 22]
    keeps = stage_keeps(576, layers, 32, target_tokens=140)
    assert keeps[:3] == [288, 144, 72] and keeps[3] == 16  # 135 + 10 * k / 32 = 140
    assert avg_tokens(576, layers, keeps, 32)[0] == pytest.approx(140.0)
    # closest integer keep: neighbours are no closer
    keeps = stage_keeps(576, layers, 32, target_tokens=141.3)
    best = abs(avg_tokens(576, layers, keeps, 32)[0] - 141.3)
    for k in (keeps[3] - 1, keeps[3] + 1):
        assert best <= abs(avg_tokens(576, layers, [*keeps[:3], k], 32)[0] - 141.3)
    assert stage_keeps(576, layers, 32, target_tokens=135, floor=0)[3] == 0


def test_keeps_unreachable_target_is_one_line():
    with pytest.raises(ValueError) as info:
        stage_keeps(576, [3, 6, 14, 22], 32, target_tokens=128)  # the published 48 at stage 3 is not ratio 0.5
    msg = str(info.value)
    assert "\n" not in msg and "unreachable" in msg and "135" in msg and "157.188" in msg
    with pytest.raises(ValueError, match="unreachable"):
        stage_keeps(576, [3, 6, 14, 22], 32, target_tokens=500)


def test_keeps_solve_target_cost():
    layers, d, m = [3, 6, 14, 22], 4096, 11008

    def cost(per_layer):
        return sum(decoder_flops(n + 40, d, m) for n in per_layer)

    for k in (0, 17, 50, 71):
        target = cost(avg_tokens(576, layers, [288, 144, 72, k], 32)[1])
        assert stage_keeps(576, layers, 32, cost=cost, target_cost=target) == [288, 144, 72, k]
    lo = cost(avg_tokens(576, layers, [288, 144, 72, 20], 32)[1])
    hi = cost(avg_tokens(576, layers, [288, 144, 72, 21], 32)[1])
    assert stage_keeps(576, layers, 32, cost=cost, target_cost=lo + 0.4 * (hi - lo))[3] == 20
    assert stage_keeps(576, layers, 32, cost=cost, target_cost=lo + 0.6 * (hi - lo))[3] == 21
    with pytest.raises(ValueError, match="target_cost .* unreachable"):
        stage_keeps(576, layers, 32, cost=cost, target_cost=1.0)


def test_keeps_argument_checks():
    with pytest.raises(ValueError, match="not both"):
        stage_keeps(576, [3, 6], 32, target_tokens=100, cost=sum, target_cost=1000)
    with pytest.raises(ValueError, match="go together"):
        stage_keeps(576, [3, 6], 32, cost=sum)
    with pytest.raises(ValueError, match="go together"):
        stage_keeps(576, [3, 6], 32, target_cost=1000)


# --------------------------------------------------------------------------------------------- recipes
def test_recipes_published_case_validate():
    dicts = stage_recipes([288, 144, 48, 0], [3, 6, 14, 22], 576, square=True)
    p = plan(LLAVA7B, dicts)
    assert [s.layer for s in p.stages] == [3, 6, 14, 22]
    assert [s.keep for s in p.stages] == [288, 144, 48, 0]
    assert [s.spatial for s in p.stages] == [144, 0, 0, 0]
    # 0.6 * 144 = 86.4 -> 86 and 1.0 * 48 = 48 as published; the rule gives 0.8 * 144 -> 115 at stage 2
    # (the published code uses 129 = floor(0.9 * 144) there, an attention share above its lambda of 0.8).
    assert [s.attention for s in p.stages] == [86, 115, 48, 0]
    assert [s.lambda_ for s in p.stages] == [0.597222, 0.798611, 1.0, None]  # the shares the counts give
    assert [s.rho for s in p.stages] == [3.7, 1.5, 1.2, 1.0]
    assert [s.rebalance for s in p.stages] == [True, True, True, False]
    assert p.average_image_tokens() == pytest.approx(129.0)


def test_recipes_tiny_square_case_validate():
    layers = [1, 2, 4, 6]
    keeps = stage_keeps(64, layers, 8)
    assert keeps == [32, 16, 8, 0]
    p = plan(TINY, stage_recipes(keeps, layers, 64, square=True))
    assert [(s.spatial, s.attention) for s in p.stages] == [(16, 9), (0, 12), (0, 8), (0, 0)]
    assert [s.diversity for s in p.stages] == [7, 4, 0, 0]
    assert [s.lambda_ for s in p.stages] == [0.5625, 0.75, 1.0, None]  # 9/16, 12/16, 8/8


def test_recipes_lower_rho_to_fit_and_skip_spatial_off_square():
    dicts = stage_recipes([48, 40], [2, 5], 64, square=False)
    assert dicts[0]["spatial"] == 0 and dicts[0]["attention"] == 28  # floor(0.6 * 48)
    assert dicts[0]["rho"] < 3.7 and math.ceil(dicts[0]["rho"] * 28 - 1e-9) <= 64
    assert dicts[1]["attention"] == 40 and math.ceil(dicts[1]["rho"] * 40 - 1e-9) <= 48
    info = ModelInfo(family="llava", num_layers=8, image_tokens=64, grid=(4, 16), fingerprint="wide")
    p = plan(info, dicts)
    assert all(s.candidates <= alive for s, alive in zip(p.stages, (64, 48)))


def test_recipes_layer_zero_is_diversity_only():
    dicts = stage_recipes([32, 16, 0], [0, 3, 6], 64, square=True, lambda_start=0.4)
    assert dicts[0] == {"layer": 0, "keep": 32, "spatial": 0, "attention": 0, "rho": 1.0, "rebalance": False,
                        "lambda": 0.0}
    assert dicts[1]["lambda"] == 1.0 and dicts[1]["attention"] == 16 and dicts[1]["spatial"] == 0
    plan(TINY, dicts)


def test_recipes_lone_stage_and_floor_keep():
    dicts = stage_recipes([16], [3], 64, square=True, lambda_start=0.5)
    assert dicts[0]["lambda"] == 0.5 and dicts[0]["spatial"] == 8 and dicts[0]["attention"] == 4
    dicts = stage_recipes([32, 16, 8], [1, 3, 5], 64, square=False, rhos=(2.0,))
    assert [d["lambda"] for d in dicts] == [0.6, 0.8, 1.0]
    assert [d["rho"] for d in dicts] == [2.0, 2.0, 2.0]
    plan(TINY, dicts)
    with pytest.raises(ValueError, match="keeps for"):
        stage_recipes([32, 16], [1], 64, square=True)


def test_paper_profile_end_to_end():
    layers = boundaries_from_drift(interpolate_profile(PAPER, 32))
    keeps = stage_keeps(576, layers, 32, target_tokens=150, floor=0)
    p = plan(LLAVA7B, stage_recipes(keeps, layers, 576, square=True))
    assert abs(p.average_image_tokens() - 150) <= 10 / 32 / 2 + 1e-9  # within half a keep step
    assert p.stages[-1].keep == 48 and p.stages[-1].lambda_ == 1.0 and p.stages[-1].attention == 48


def test_focus_layer_and_diversity_before_it():
    """toy-vlm's concentration profile (top-10 share of the image attention per layer): level halfway between
    uniform (10/81) and the peak 0.75 is 0.437; layer 0 is above it but layers 1-2 are not, so the attention stays
    concentrated from layer 3 on, and a stage ranks by it from layer 4."""
    assert focus_layer([0.50, 0.29, 0.35, 0.62, 0.75, 0.70], 10 / 81) == 3
    assert focus_layer([0.1, 0.1, 0.1, 0.9], 0.1) == 3 and focus_layer([0.3] * 4, 0.1) == 0
    assert focus_layer([], 0.1) == 0
    dicts = stage_recipes([40, 20, 10], [1, 3, 4], 81, square=True, attention_from=4)
    assert [(d["spatial"], d["attention"]) for d in dicts] == [(20, 0), (0, 0), (0, 10)]


def test_fit_keeps_solves_every_keep_jointly():
    mean = lambda per_layer: sum(per_layer) / 6  # noqa: E731
    assert fit_keeps(81, [0, 4], [20, 13], 6, mean, 17.82) == [20, 13]  # 17.67; one keep more gives 18.0
    assert fit_keeps(81, [0, 4], [20, 13], 6, mean, 8.91) == [10, 7]  # 9.0: the nearest the weights allow
    assert fit_keeps(81, [0, 4], [20, 13], 6, mean, 3.0, floor=5) == [6, 5]  # the floor binds: nearest is 5.67
    assert fit_keeps(81, [1, 2, 3, 4], [16, 8, 3, 0], 6, mean, 18.0) == [16, 8, 3, 0]  # a weight 0 keeps 0
    with pytest.raises(ValueError, match="no strictly decreasing keeps"):
        fit_keeps(3, [1, 2, 3], [3, 2, 1], 4, mean, 1.0, floor=2)
