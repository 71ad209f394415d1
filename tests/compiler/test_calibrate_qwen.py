"""btp-calibrate on a family whose image-token count follows the image's size: calibration images of mixed
sizes, statistics per image share, a share plan that runs at any image size."""

import pytest
from PIL import Image

from btp.compiler import reference_pipeline
from btp.compiler.calibrate import Target, calibrate, collect_profile
from btp.compiler.calibration_data import Sample, builtin_samples
from btp.compiler.presets import model_info
from btp.compiler.search import batches
from btp.compiler.space import StageSpec, budget_for, realise
from btp.graphs.selection import share_count

SIZES = [(96, 96), (224, 112)]  # 6x6 and 8x16 patches: 9 and 32 image tokens (the nominal N0 is 64)


@pytest.fixture(scope="module")
def mixed():
    base = builtin_samples(6, seed=1)
    return [Sample(s.image.resize(SIZES[i % 2]), s.prompt, s.source) for i, s in enumerate(base)]


def test_batches_hold_one_image_size_each(mixed):
    groups = list(batches(mixed, 2, by_size=True))
    assert [len(g) for g in groups] == [2, 1, 2, 1]
    assert all(len({s.image.size for s in g}) == 1 for g in groups)
    assert sorted(s.source for g in groups for s in g) == sorted(s.source for s in mixed)


def test_mixed_size_profile_is_the_mean_of_per_image_statistics(tiny_qwen, mixed):
    whole = collect_profile(tiny_qwen, mixed, batch_size=4)
    parts = [collect_profile(tiny_qwen, [s for s in mixed if s.image.size == size], batch_size=4) for size in SIZES]
    weights = [p.samples for p in parts]
    for key in ("drift", "attention", "concentration"):
        mean = [sum(w * getattr(p, key)[i] for w, p in zip(weights, parts)) / sum(weights)
                for i in range(tiny_qwen.num_layers)]
        assert getattr(whole, key) == pytest.approx(mean, rel=1e-9, abs=1e-12), key
    assert whole.text_tokens == pytest.approx(sum(w * p.text_tokens for w, p in zip(weights, parts)) / 6)
    assert whole.uniform == pytest.approx((3 * 1 / 9 + 3 * 4 / 32) / 6)  # top N/8 of 9 and of 32 tokens
    # Drift is a share of each image's tokens at the nominal N0: with every token turning, 64 in every layer,
    # although no image here has more than 32 tokens.
    strict = collect_profile(tiny_qwen, mixed, tau=0.999999, batch_size=4)
    assert strict.drift == [64.0] * tiny_qwen.num_layers


def test_calibrated_plan_states_shares_and_runs_at_every_image_size(tiny_qwen, mixed):
    result = calibrate(tiny_qwen, mixed, Target(retention=0.3), method="drift", batch_size=4)
    plan = result.plan
    assert plan.dynamic and plan.score == "probs" and len(plan.stages) == 4
    assert all(s.share is not None and s.spatial == 0 for s in plan.stages)
    assert abs(plan.average_image_tokens() - 0.3 * 64) <= 0.02 * 0.3 * 64
    assert plan.calibration["samples"] == 4 and len(plan.calibration["drift"]) == 8
    pipe = reference_pipeline(tiny_qwen, plan)
    for size, n in ((SIZES[0], 9), (SIZES[1], 32), ((224, 224), 64)):
        image = Image.linear_gradient("L").resize(size).convert("RGB")
        out = pipe.generate([image], ["What is shown?"], max_new_tokens=1)
        kept = [len(k) for k in out.kept_indices[0]]
        assert kept == [share_count(n, s.share) for s in plan.stages] == [k for k, _ in plan.stage_counts(n)]


def test_search_space_realises_share_plans_on_dynamic_models(tiny_qwen):
    info = model_info(tiny_qwen)
    budget = budget_for(tiny_qwen, Target(retention=0.25))
    plan = realise(info, (StageSpec(0, 3.0, 0.0), StageSpec(3, 2.0, 1.0, spatial=0.5)), budget, floor=2)
    assert budget.meets(plan) and plan.score == "probs"
    assert [s.spatial for s in plan.stages] == [0, 0]  # no seeds: the grid follows the image
    assert [s.keep for s in plan.stages] == [share_count(64, s.share) for s in plan.stages]
