"""Every command line refuses an unwritable output path in one line, exit code 2, before loading anything."""

import pytest

from btp.cli import bench, bench_quality, check, demo, gpu_check, run, train_toy
from btp.cli import calibrate as calibrate_cli
from btp.runtime import Pipeline

SAMPLE = "tools/data/sample.png"


def _never(*args, **kwargs):
    pytest.fail("the work started before the output path was checked")  # BaseException: run_main lets it through


# (prog, main, argv given the bad path, the option, attributes that would start the work, the option's kind)
CASES = [
    ("btp-run", run.main, lambda bad: ["art", "--image", SAMPLE, "--prompt", "Hi", "--explain", bad], "--explain",
     [(Pipeline, "load")], "file"),
    ("btp-demo", demo.main, lambda bad: ["--explain", bad], "--explain",
     [("btp.compiler.load_model", None), ("btp.compiler.reference_pipeline", None)], "file"),
    ("btp-check", check.main, lambda bad: ["art", "--save", bad], "--save", [(check, "run_check")], "directory"),
    ("btp-calibrate", calibrate_cli.main, lambda bad: ["builtin:tiny-llava", "--data", "builtin", "-o", bad], "-o",
     [(calibrate_cli, "load_model")], "file"),
    ("btp-calibrate", calibrate_cli.main,
     lambda bad: ["builtin:tiny-llava", "--data", "builtin", "-o", "plan.json", "--plot", bad], "--plot",
     [(calibrate_cli, "load_model")], "file"),
    ("btp-train-toy", train_toy.main, lambda bad: ["--out", bad], "--out", [(train_toy, "train_and_save")],
     "directory"),
    ("btp-bench", bench.main, lambda bad: ["art", "--plot", bad], "--plot", [(bench, "bench"), (bench, "sweep")],
     "file"),
    ("btp-bench-quality", bench_quality.main, lambda bad: ["--plot", bad], "--plot", [(bench_quality, "quality")],
     "file"),
    ("btp-gpu-check", gpu_check.main, lambda bad: ["--out", bad], "--out",
     [(gpu_check, "environment"), (gpu_check, "build_and_check")], "file"),
]


@pytest.mark.parametrize("bad_kind", ["under a file", "wrong kind"])
@pytest.mark.parametrize(("prog", "main", "argv", "option", "work", "kind"), CASES,
                         ids=[f"{c[0]} {c[3]}" for c in CASES])
def test_unwritable_output_is_refused_before_the_work(tmp_path, monkeypatch, capsys, prog, main, argv, option, work,
                                                      kind, bad_kind):
    monkeypatch.chdir(tmp_path)  # a good path such as calibrate's plan.json lands here, if anywhere
    (tmp_path / "file.txt").write_text("x")
    for target, name in work:
        if name is None:
            monkeypatch.setattr(target, _never)
        else:
            monkeypatch.setattr(target, name, _never)
    monkeypatch.setattr(gpu_check, "require_device", lambda *a, **k: None)  # this machine may lack a GPU
    monkeypatch.setattr(gpu_check, "require", lambda *a, **k: None)
    if bad_kind == "under a file":  # refused for root too, unlike a read-only directory
        bad, found = str(tmp_path / "file.txt" / "out"), f"{tmp_path / 'file.txt'} is not a directory"
    elif kind == "file":
        bad, found = str(tmp_path), "found a directory"
    else:
        bad, found = str(tmp_path / "file.txt"), "found a file"
    assert main(argv(bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"{prog}: error: {option} {bad}: expected a writable {kind} path, found ")
    assert found in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
