"""What every `btp-*` command promises (`btp.cli.common`): exit code 2 and one `btp-NAME: error:` line for bad
input, `--json` prints one JSON object and nothing else on stdout, exit code 1 when a check finds a mismatch."""

import importlib
import json
import re
from pathlib import Path

import pytest
import torch

from btp.cli import bench, bench_quality, bench_serve, check, demo, gpu_check, run, train_toy
from btp.cli import calibrate as calibrate_cli
from btp.cli import compile as compile_cli
from btp.cli import serve as serve_cli
from btp.runtime.dependencies import importable

SAMPLE = "tools/data/sample.png"
ROOT = Path(__file__).resolve().parents[2]

MAINS = {
    "btp-compile": compile_cli.main, "btp-run": run.main, "btp-check": check.main, "btp-bench": bench.main,
    "btp-bench-quality": bench_quality.main, "btp-calibrate": calibrate_cli.main, "btp-demo": demo.main,
    "btp-train-toy": train_toy.main, "btp-gpu-check": gpu_check.main, "btp-serve": serve_cli.main,
    "btp-bench-serve": bench_serve.main,
}
# Old spellings, hidden: everywhere, and where the command once took them (btp-train-toy's --steps counts its own
# optimizer steps).
DEPRECATED = ["--new-tokens", "--batch-size"]
ALIASES = {"btp-check": [("--steps", "--max-new-tokens")], "btp-bench": [("--new-tokens", "--max-new-tokens")],
           "btp-calibrate": [("--batch-size", "--batch")]}
# The smallest run of btp-train-toy its own tests use.
TRAIN_TOY = ["--steps", "2", "--batch", "2", "--turns", "2", "--vision-steps", "2", "--vision-batch", "3",
             "--test-samples", "6", "--threads", "1", "--quiet"]


def test_every_installed_command_is_covered():
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', section, re.M))  # tomllib is Python 3.11+
    assert set(scripts) == set(MAINS)
    for name, target in scripts.items():
        module, func = target.split(":")
        assert getattr(importlib.import_module(module), func) is MAINS[name], name


@pytest.mark.parametrize("prog", sorted(MAINS))
def test_help_shows_the_shared_options_and_hides_old_spellings(prog, capsys):
    with pytest.raises(SystemExit) as exit_:
        MAINS[prog](["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--json" in out and "--debug" in out
    shown = set(out.replace(",", " ").replace("[", " ").replace("]", " ").split())
    assert not shown & {*DEPRECATED, *(old for old, _ in ALIASES.get(prog, []))}
    assert {new for _, new in ALIASES.get(prog, [])} <= shown


# prog -> argv naming a missing model or artifact (btp-train-toy reads none: its output under a file)
MISSING = {
    "btp-compile": lambda t: [f"{t}/missing", "--plan", "btp", "-o", f"{t}/out"],
    "btp-run": lambda t: [f"{t}/missing", "--image", SAMPLE, "--prompt", "Hi"],
    "btp-check": lambda t: [f"{t}/missing", "--samples", "1"],
    "btp-bench": lambda t: [f"{t}/missing"],
    "btp-bench-quality": lambda t: [f"{t}/missing", "--plans", "none", "--cache", f"{t}/cache"],
    "btp-calibrate": lambda t: [f"{t}/missing", "--data", "builtin", "-o", f"{t}/plan.json"],
    "btp-demo": lambda t: ["--model", f"{t}/missing"],
    "btp-train-toy": lambda t: ["--out", f"{t}/file.txt/model", *TRAIN_TOY],
    "btp-gpu-check": lambda t: ["--models", f"{t}/missing", "--out", f"{t}/r.json", "--work", f"{t}/work"],
    "btp-serve": lambda t: [f"{t}/missing"],
    "btp-bench-serve": lambda t: [f"{t}/missing"],
}


@pytest.mark.parametrize("prog", sorted(MISSING))
def test_missing_input_exits_2_with_one_line(prog, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    assert MAINS[prog](MISSING[prog](tmp_path)) == 2
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    assert str(tmp_path) in err[0] and out.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing written


@pytest.mark.parametrize(("prog", "old"), [("btp-check", "--steps"), ("btp-bench", "--new-tokens")])
def test_old_spellings_still_parse(prog, old, tmp_path, capsys):
    assert MAINS[prog]([str(tmp_path / "missing"), old, "2"]) == 2
    assert capsys.readouterr().err.startswith(f"{prog}: error: {tmp_path / 'missing'}")  # the artifact, not usage
    assert calibrate_cli.parser().parse_args(["m", "--data", "builtin", "-o", "p", "--batch-size", "3"]).batch == 3


def _gpu_check_argv(tmp_path, monkeypatch, passed: bool = True) -> list[str]:
    """A real run of the smallest matrix on a CUDA host with TensorRT; elsewhere its builds and benchmarks are
    stand-ins (a CPU cannot build engines), so that what is checked is the command's JSON and exit code."""
    argv = ["--models", "builtin:tiny-llava", "--presets", "none", "--dtypes", "float32", "--no-pytest", "--no-bench",
            "--out", str(tmp_path / "r.json"), "--work", str(tmp_path / "work"), "--json"]
    if torch.cuda.is_available() and importable("tensorrt") and passed:
        return argv
    monkeypatch.setattr(gpu_check, "require_device", lambda *a, **k: None)
    require = gpu_check.require
    monkeypatch.setattr(gpu_check, "require", lambda name, *a, **k: None if name == "tensorrt" else require(name))
    monkeypatch.setattr(gpu_check, "build_and_check", lambda model, preset, dtype, root, log: {
        "model": model, "plan": preset, "dtype": dtype, "passed": passed})
    return argv


# prog -> argv of a small valid run, given tmp_path and a function that returns the session's tiny artifact
JSON = {
    "btp-compile": lambda t, art: ["builtin:tiny-llava", "--plan", "none", "-o", f"{t}/art", "--backend",
                                   "onnxruntime", "--max-batch", "2", "--max-prompt", "128", "--max-new-tokens", "8",
                                   "--check"],
    "btp-run": lambda t, art: [art(), "--image", SAMPLE, "--prompt", "What is shown?", "--max-new-tokens", "2"],
    "btp-check": lambda t, art: [art(), "--samples", "1", "--max-new-tokens", "2"],
    "btp-bench": lambda t, art: [art(), "--baseline", "hf", "--repeat", "1", "--max-new-tokens", "2",
                                 "--prompt-tokens", "4"],
    "btp-bench-quality": lambda t, art: ["builtin:toy-vlm", "--plans", "none", "--samples", "2", "--batch", "2",
                                         "--cache", f"{t}/cache"],
    "btp-calibrate": lambda t, art: ["builtin:tiny-llava", "--data", "builtin", "--samples", "4", "-o",
                                     f"{t}/plan.json"],
    "btp-demo": lambda t, art: ["--model", "builtin:tiny-llava", "--max-new-tokens", "2"],
    "btp-train-toy": lambda t, art: ["--out", f"{t}/model", *TRAIN_TOY],
    "btp-gpu-check": None,
    "btp-serve": lambda t, art: [art(), "--check-config"],
    "btp-bench-serve": lambda t, art: [art(), "--clients", "2", "--requests", "2", "--max-new-tokens", "2"],
}
# One key of each command's result, to show that the object printed is the result.
KEYS = {"btp-compile": "check", "btp-run": "token_ids", "btp-check": "graphs", "btp-bench": "ratios",
        "btp-bench-quality": "rows", "btp-calibrate": "plan", "btp-demo": "answer", "btp-train-toy": "test_accuracy",
        "btp-gpu-check": "artifacts", "btp-serve": "max_batch", "btp-bench-serve": "ratios"}


@pytest.mark.parametrize("prog", sorted(JSON))
def test_json_is_one_object_on_stdout(prog, artifact, tmp_path, monkeypatch, capsys):
    argv = _gpu_check_argv(tmp_path, monkeypatch) if prog == "btp-gpu-check" else \
        [*JSON[prog](tmp_path, lambda: str(artifact("btp"))), "--json"]
    assert MAINS[prog](argv) == 0, capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1, out[:2000]
    doc = json.loads(out)
    assert isinstance(doc, dict) and KEYS[prog] in doc
    if prog == "btp-compile":
        assert doc["check"]["passed"] and [g["name"] for g in doc["graphs"]] == ["vision", "embed", "stage0", "head"]


# A failing btp-check (exit 1, a real mismatch): test_check.py::test_check_fails_naming_the_graph_and_output.


def test_a_failing_gpu_check_exits_1_with_its_report(tmp_path, monkeypatch, capsys):
    assert gpu_check.main(_gpu_check_argv(tmp_path, monkeypatch, passed=False)) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False and json.loads((tmp_path / "r.json").read_text()) == report
