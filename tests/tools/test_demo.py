from btp.tools.demo import kept_map, main


def test_kept_map_marks_kept_patches():
    assert kept_map([0, 3], (2, 2)) == "#.\n.#"


def test_demo_runs_and_reports_stages(capsys):
    assert main(["--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "prune1" in out and "layer-averaged image tokens: 17.25 of 64" in out


def test_demo_bad_plan_exits_2(capsys):
    assert main(["--plan", "nonsense"]) == 2
    assert "unknown plan 'nonsense'" in capsys.readouterr().err
