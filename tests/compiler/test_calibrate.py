"""btp-calibrate: statistics, the rule's plan against a target, the search, outputs and bad data."""

import json

import pytest
from PIL import Image

from btp.cli import calibrate as calibrate_cli
from btp.compiler import Plan
from btp.compiler.calibrate import (
    Genome,
    Profile,
    Target,
    collect_profile,
    distortion,
    plan_from,
    reachable_start,
    reference_outputs,
    rule_genome,
    score,
    search,
)
from btp.compiler.calibration_data import builtin_samples, split
from btp.compiler.space import budget_for


@pytest.fixture(scope="module")
def data():
    return split(builtin_samples(12, seed=3), 0.25)


@pytest.fixture(scope="module")
def profile(tiny, data):
    return collect_profile(tiny, data[0], tau=0.93, batch_size=4)


def test_profile_has_one_value_per_layer(tiny, profile, data):
    assert len(profile.drift) == len(profile.attention) == tiny.num_layers
    assert all(0 <= d <= tiny.image_tokens for d in profile.drift)
    assert all(0 < a <= 1 for a in profile.attention)
    assert profile.samples == len(data[0]) and profile.text_tokens > 1
    loose = collect_profile(tiny, data[0][:4], tau=0.2)
    strict = collect_profile(tiny, data[0][:4], tau=0.999)
    assert sum(loose.drift) < sum(strict.drift)  # a higher tau counts more tokens as drifting


@pytest.mark.parametrize("target", [Target(retention=0.25), Target(tokens=12.0), Target(flops=0.5)])
def test_rule_plan_meets_its_target_within_2_percent(tiny, profile, target):
    text = round(profile.text_tokens)
    plan = plan_from(tiny, Genome((1, 2, 3, 5)), target, text)
    avg = plan.average_image_tokens()
    if target.flops is not None:
        full = Plan.parse(json.loads(plan.to_json()) | {"stages": []}).flops(tiny.hidden_size,
                                                                             tiny.intermediate_size, text)
        got = plan.flops(tiny.hidden_size, tiny.intermediate_size, text) / full
        assert abs(got - target.flops) <= 0.02 * target.flops
    else:
        want = target.tokens if target.tokens is not None else target.retention * tiny.image_tokens
        assert abs(avg - want) <= 0.02 * want


def test_search_is_never_worse_than_the_rule_on_calibration(tiny, profile, data):
    cal = data[0]
    text = round(profile.text_tokens)
    target = Target(retention=0.25)
    ref = reference_outputs(tiny, cal, 4)
    start = plan_from(tiny, Genome((1, 2, 3, 4)), target, text)
    seen = []
    result = search(tiny, {"rule": start}, budget_for(tiny, target, text), cal, ref, budget_evals=8, batch_size=4,
                    progress=lambda done, total, best: seen.append((done, total, best)))
    rule = distortion(tiny, start, cal, ref, 4)
    assert result.evaluations <= 8 and result.starts == {"rule": score(rule)}
    assert score(result.distortion) <= score(rule) + 1e-9
    assert abs(result.plan.average_image_tokens() - 16) <= 0.02 * 16
    # progress: evaluations so far, the budget, the best distortion so far (never rising)
    assert [d for d, _, _ in seen] == list(range(1, len(seen) + 1)) and {t for _, t, _ in seen} == {8}
    assert all(b <= a for (_, _, a), (_, _, b) in zip(seen, seen[1:])) and seen[-1][2] == score(result.distortion)


def test_unreachable_target_is_a_plan_error(tiny, profile):
    from btp.runtime.errors import PlanError

    with pytest.raises(PlanError, match="reachable"):
        plan_from(tiny, Genome((1, 2, 3, 5)), Target(tokens=63.9), round(profile.text_tokens))


def test_late_boundaries_move_earlier_until_the_target_is_reachable(tiny, profile):
    """On a shallow model the rule's cuts can come too late for a low target; the search starts from the same
    boundaries moved back just far enough."""
    from btp.runtime.errors import PlanError

    text = round(profile.text_tokens)
    late = Genome((4, 5, 6, 7))
    target = Target(retention=0.25)  # 16 of 64 tokens: a first cut at layer 4 keeps at least 4 * 64 / 8 = 32
    with pytest.raises(PlanError, match="out of reach"):
        plan_from(tiny, late, target, text)
    moved = reachable_start(tiny, late, target, text)
    assert moved.layers[0] < 4 and all(b - a == 1 for a, b in zip(moved.layers, moved.layers[1:]))
    assert moved.layers[0] >= 0 and plan_from(tiny, moved, target, text).stages[0].layer == moved.layers[0]
    assert abs(plan_from(tiny, moved, target, text).average_image_tokens() - 16) <= 0.02 * 16
    # one layer less moved would not reach it
    back = moved.layers[0] + 1
    with pytest.raises(PlanError):
        plan_from(tiny, Genome(tuple(range(back, back + 4))), target, text)
    assert reachable_start(tiny, Genome((1, 2, 3, 5)), target, text) == Genome((1, 2, 3, 5))  # reachable: kept
    with pytest.raises(PlanError, match=r"boundaries \[4, 5, 6, 7\].*moved back as far as \[0, 1, 2, 3\]"):
        reachable_start(tiny, late, Target(tokens=0.5), text)  # halving keeps from layer 0: at least 32/8 + ...
    # the library names its parameter; btp-calibrate names the flag (the CLI case below)
    with pytest.raises(PlanError, match="^stages must be 1 to 7 on a model with 8 layers"):
        rule_genome(Profile(drift=[0.0] * 8, attention=[0.1] * 8, samples=1, tau=0.9, text_tokens=5.0), 8)


def test_cli_writes_a_plan_and_plot_that_compile_and_run(tmp_path, capsys):
    from btp.compiler.build import BuildConfig, compile_artifact
    from btp.compiler.export import Limits
    from btp.runtime import Pipeline

    plan_path, png = tmp_path / "plan.json", tmp_path / "plan.png"
    # The rule cuts this random model at layers 4-7 (its image tokens drift through layer 4), which keeps at least
    # half of them on average: 60% is in reach of the rule's boundaries, and the plan must land within 2% of it.
    code = calibrate_cli.main(["builtin:tiny-llava", "--data", "builtin", "--samples", "8", "--retention", "0.6",
                               "-o", str(plan_path), "--plot", str(png)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "layer-averaged image tokens" in out and "distortion" in out
    plan = Plan.load(plan_path)
    assert abs(plan.average_image_tokens() - 0.6 * 64) <= 0.02 * 0.6 * 64
    cal = plan.calibration
    assert cal["method"] == "drift" and len(cal["drift"]) == 8 and "heldout" in cal["distortion"]["rule"]
    with Image.open(png) as im:
        assert im.width > 400 and im.height > 300
    out_dir = tmp_path / "art"
    compile_artifact(BuildConfig(model="builtin:tiny-llava", plan=str(plan_path), out=out_dir,
                                 limits=Limits(max_prompt=256, max_new_tokens=16)))
    pipe = Pipeline.load(out_dir)
    result = pipe.generate(builtin_samples(1)[0].image, ["What is shown?"], max_new_tokens=3)
    assert [len(k) for k in result.kept_indices[0]] == [s.keep for s in plan.stages]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{missing}"], "calibration data directory not found"),
        (["--data", "{badjson}"], "prompts.jsonl:1"),
        (["--data", "builtin", "--tau", "1.5"], "--tau must be in (0, 1)"),
        (["--data", "builtin", "--retention", "1.7"], "--retention must be a fraction"),
        (["--data", "builtin", "--stages", "40"], "--stages must be 1 to 7 on a model with 8 layers"),
    ],
)
def test_bad_calibration_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "prompts.jsonl").write_text("{not json\n")
    args = [a.replace("{missing}", str(tmp_path / "nope")).replace("{badjson}", str(bad)) for a in args]
    code = calibrate_cli.main(["builtin:tiny-llava", "--samples", "4", *args, "-o", str(tmp_path / "p.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "p.json").exists()


def test_cli_search_without_target_keeps_the_rule_plans_tokens(tmp_path, capsys):
    path = tmp_path / "plan.json"
    code = calibrate_cli.main(["builtin:tiny-llava", "--data", "builtin", "--samples", "8", "--method", "search",
                               "--budget-evals", "5", "-o", str(path)])
    assert code == 0, capsys.readouterr().err
    plan = Plan.load(path)
    report = plan.calibration["distortion"]
    rule_avg = report["rule"]["average_tokens"]
    assert abs(plan.average_image_tokens() - rule_avg) <= 0.02 * rule_avg
    assert score(report["search"]["calibration"]) <= score(report["rule"]["calibration"]) + 1e-9
    starts = report["search"]["starts"]
    assert report["search"]["evaluations"] <= max(5, len(starts))  # every start is evaluated, whatever the budget
    # every start it was given is scored, the rule's and the presets at the same tokens among them
    assert "rule" in starts and any(k.startswith("preset:") for k in starts)
    assert score(report["search"]["calibration"]) <= min(starts.values()) + 1e-6
    # the floor (N0/16) is kept by default: by the rule's plan, and by the search's unless a preset won verbatim
    assert report["rule"]["keeps"][-1] >= 64 // 16
    assert plan.stages[-1].keep >= 64 // 16 or report["search"]["origin"].startswith("preset:")
