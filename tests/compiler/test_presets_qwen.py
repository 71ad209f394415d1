"""Presets on a family whose image-token count follows the image's size (Qwen2.5-VL): keeps stated as shares,
the published Qwen2.5-VL schedule scaled to depth, valid counts at every image size, the budget forms."""

import math

import pytest

from btp.compiler import ModelInfo, resolve_plan
from btp.compiler.presets import PRESETS, at_budget, btp, fastv, schedule, share_of, token_tolerance
from btp.graphs.selection import share_count
from btp.runtime.errors import PlanError

QWEN7B = ModelInfo(family="qwen2_5_vl", num_layers=28, image_tokens=16384, grid=(128, 128), fingerprint="qwen-7b",
                   dynamic=True)
TINY = ModelInfo(family="qwen2_5_vl", num_layers=8, image_tokens=64, grid=(8, 8), fingerprint="tiny-qwen",
                 dynamic=True)


def assert_valid_counts(plan, n):
    """At `n` image tokens: keeps never grow, attention picks fit in the keep, candidate pools in what they rank."""
    alive = n
    for i, (s, (keep, attention)) in enumerate(zip(plan.stages, plan.stage_counts(n))):
        assert 0 <= keep <= alive and 0 <= attention <= keep, (n, i, keep, attention, alive)
        candidates = s.model_copy(update={"attention": attention}).candidates if attention else 0
        assert candidates <= alive, (n, i, candidates, alive)
        alive = keep


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_resolves_on_tiny_qwen_with_shares_and_valid_counts(tiny_qwen, name):
    plan = resolve_plan(name, tiny_qwen)
    assert plan.dynamic and plan.model.image_tokens == 64 and tiny_qwen.num_layers == 8
    assert (len(plan.stages) > 0) == (name != "none")
    for s in plan.stages:
        assert s.share is not None and s.spatial == 0
        assert s.keep == share_count(64, s.share)
    assert plan.stage_counts(64) == [(s.keep, s.attention) for s in plan.stages]
    for n in (4, 16, 64, 5, 37):
        assert_valid_counts(plan, n)
    for n in (4, 16):
        assert [k for k, _ in plan.stage_counts(n)] == [math.floor(n * s.share) for s in plan.stages]


def test_btp_is_the_published_qwen_schedule_scaled_to_depth():
    plan = btp(QWEN7B)  # on its own depth: N/2 at layer 3, N/4 at 6, N/8 at 15, kept to the end
    assert [s.layer for s in plan.stages] == [3, 6, 15]
    assert [s.share for s in plan.stages] == [0.5, 0.25, 0.125]
    assert [s.keep for s in plan.stages] == [8192, 4096, 2048]
    assert [s.attention for s in plan.stages] == [1638, 2048, 1638]  # floor(lambda * keep), lambda 0.2, 0.5, 0.8
    assert [s.lambda_ for s in plan.stages] == pytest.approx([0.2, 0.5, 0.8], abs=1e-3)
    assert [s.rho for s in plan.stages] == [1.2, 1.0, 1.2] and [s.rebalance for s in plan.stages] == [0, 0, 1]
    assert plan.score == "probs" and {s.selection for s in plan.stages} == {"exclusive"}
    # Layer-averaged: 3 layers at N, 3 at N/2, 9 at N/4, 13 at N/8 of 28.
    assert plan.average_image_tokens() == pytest.approx(16384 * (3 + 1.5 + 2.25 + 13 / 8) / 28)
    assert schedule(QWEN7B).average_share() == pytest.approx((3 + 1.5 + 2.25 + 13 / 8) / 28)
    tiny = btp(TINY)
    assert [(s.layer, s.keep, s.attention) for s in tiny.stages] == [(1, 32, 6), (2, 16, 8), (4, 8, 6)]
    # Counts at N: keep(N) = floor(N * share), attention keep(N) * attention // keep.
    assert tiny.stage_counts(16) == [(8, 1), (4, 2), (2, 1)]
    assert tiny.stage_counts(4) == [(2, 0), (1, 0), (0, 0)]


@pytest.mark.parametrize("info", [TINY, QWEN7B], ids=["tiny", "7b"])
@pytest.mark.parametrize("name", ["btp", "fastv", "pdrop", "divprune"])
def test_presets_on_dynamic_models_have_share_stages_and_valid_counts(info, name):
    plan = PRESETS[name](info)
    assert all(s.share is not None and s.spatial == 0 for s in plan.stages)
    for n in (4, 16, 64, 400, info.image_tokens):
        assert_valid_counts(plan, n)


@pytest.mark.parametrize("info", [TINY, QWEN7B], ids=["tiny", "7b"])
@pytest.mark.parametrize(("name", "share"), [("btp", 0.22), ("btp", 0.3), ("fastv", 0.22), ("divprune", 0.11),
                                             ("divprune", 0.22), ("pdrop", 0.3)])
def test_budget_forms_on_dynamic_models_hit_the_share_with_share_stages(info, name, share):
    plan = at_budget(name, info, share)
    target = share * info.image_tokens
    assert abs(plan.average_image_tokens() - target) <= token_tolerance(target)
    assert plan.calibration == {"method": f"preset:{name}@{share:g}"}
    for s in plan.stages:
        assert s.share is not None and s.spatial == 0 and s.keep == share_count(info.image_tokens, s.share)
    for n in (4, 16, 64):
        assert_valid_counts(plan, n)


def test_budget_out_of_reach_on_a_dynamic_model_is_a_one_line_plan_error():
    with pytest.raises(PlanError, match=r"btp at a layer-averaged share of 0.11 is out of reach .* 8 layers"):
        at_budget("btp", TINY, 0.11)


def test_share_of_gives_the_smallest_share_of_a_keep():
    assert share_of(32, 64) == 0.5 and share_of(21, 64) == 0.3282 and share_of(0, 64) == 0.0
    for n0 in (64, 576, 1280):
        for keep in range(n0):
            assert share_count(n0, share_of(keep, n0)) == keep
    # Above 10^4 tokens one share step moves the count by more than one: the keep rounds up to the next count.
    keep = fastv(QWEN7B).stages[0].keep
    assert keep == share_count(16384, fastv(QWEN7B).stages[0].share)


def test_fixed_size_presets_have_no_shares(tiny):
    for name in PRESETS:
        plan = resolve_plan(name, tiny)
        assert not plan.dynamic and all(s.share is None for s in plan.stages)
    plan = resolve_plan("btp", tiny)
    assert plan.score == "logits" and plan.stages[0].spatial > 0 and plan.stages[0].selection == "released"
