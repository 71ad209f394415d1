"""`btp-demo` and the bundled demo inputs: the trained toy model answers the bundled question right."""

import json

import numpy as np

from btp.cli.demo import kept_map, main
from btp.compiler import load_model
from btp.compiler.plan import Plan
from btp.compiler.presets import model_info
from btp.tools.samples import TOY_ANSWER, toy_plan_path, toy_scene
from btp.toy.task import solve


def test_kept_map_marks_kept_patches():
    assert kept_map([0, 3], (2, 2)) == "#.\n.#"


def test_bundled_plan_fits_the_toy_model_at_22_percent():
    plan = Plan.load(toy_plan_path())
    plan.check_model(model_info(load_model("builtin:toy-vlm")))
    assert [(s.layer, s.keep) for s in plan.stages] == [(0, 20), (4, 13)]
    assert abs(plan.average_image_tokens() / 81 - 0.22) < 0.005
    assert json.loads(toy_plan_path().read_text())["format"] == "btp-plan/1"


def test_bundled_scene_is_a_toy_task_image_with_the_stated_answer():
    from btp.toy.task import make_split

    sample = make_split("test", 120)[75]
    assert np.array_equal(np.asarray(toy_scene()), np.asarray(sample.image))
    assert solve(sample.objects, "Where is the white circle?") == TOY_ANSWER


def test_demo_answers_the_bundled_question_right(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert f"answer   {TOY_ANSWER}  (right)" in out
    assert "prune0" in out and "prune1" in out and "20 kept" in out and "13 kept" in out
    assert "layer-averaged image tokens: 17.67 of 81" in out


def test_demo_on_a_random_weight_model_says_so(capsys):
    assert main(["--model", "builtin:tiny-llava", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "random weights" in out and "layer-averaged image tokens: 17.25 of 64" in out


def test_demo_bad_plan_exits_2(capsys):
    assert main(["--plan", "nonsense"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown plan 'nonsense'" in err[0]
