"""btp-check: Polygraphy comparisons of every graph against the torch reference, and end-to-end tokens."""

import importlib.util
import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from btp.artifact.manifest import read_manifest
from btp.cli import check as check_cli
from btp.tools import check


def test_check_passes_on_a_fresh_artifact_and_saves_polygraphy_data(artifact, tmp_path, capsys):
    save = tmp_path / "pg"
    assert check_cli.main([str(artifact("btp")), "--samples", "2", "--max-new-tokens", "3", "--json",
                       "--save", str(save)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["tokens"]["mean"] == 1.0
    assert report["runners"] == ["torch", "onnxruntime"] and report["pipeline_backend"] == "onnxruntime"
    assert report["tensorrt_skipped"].startswith("the artifact has no TensorRT engines")
    graphs = {g["graph"]: g for g in report["graphs"]}
    assert all(g["runners"] == ["onnxruntime"] and g["profile_feeds"] == [] for g in graphs.values())
    assert all(set(g["errors"]["onnxruntime"]) <= set(g["worst"]) for g in graphs.values())
    assert set(graphs) == set(read_manifest(artifact("btp")).graphs)
    assert all(g["feeds"] >= 2 for g in graphs.values())  # captured from real runs
    assert graphs["stage1"]["feeds"] > graphs["prune1"]["feeds"]  # stages also run in decode
    assert (save / "prune1.inputs.json").is_file() and (save / "prune1.outputs.json").is_file()
    # The printed reproduction line works with Polygraphy's own CLI.
    polygraphy = shutil.which("polygraphy") or str(__import__("pathlib").Path(sys.executable).parent / "polygraphy")
    proc = subprocess.run([polygraphy, "run", str(artifact("btp") / "onnx" / "prune1.onnx"), "--onnxrt",
                           "--load-inputs", str(save / "prune1.inputs.json"),
                           "--load-outputs", str(save / "prune1.outputs.json"), "--atol", "1e-4", "--rtol", "1e-4"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_check_fails_naming_the_graph_and_output(artifact, tmp_path, capsys, perturbed_head):
    root = perturbed_head(artifact("btp"), tmp_path / "art")
    assert check_cli.main([str(root), "--samples", "1", "--max-new-tokens", "2", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    failing = [g for g in report["graphs"] if not g["passed"]]
    assert [g["graph"] for g in failing] == ["head"]
    assert failing[0]["failures"][0].startswith("onnxruntime: logits")
    assert not report["passed"]


def test_stat_failure_thresholds():
    x = np.linspace(-1, 1, 1000).astype(np.float32)
    assert check._stat_failure(x, x, "float16") is None
    assert check._stat_failure(x, x + 0.2, "float16") is not None


def _judged(refs, outs, stats="float16", tol=None):
    report = check.GraphReport("g", len(refs), True)
    check._judge(report, "onnxruntime", [{"h": r} for r in refs], {i: {"h": o} for i, o in enumerate(outs)},
                 [{}] * len(refs), None, "float16", stats=stats, tol=tol)
    return report.failures


def test_small_feeds_pool_their_99th_percentile():
    """Decode steps of 64 values: two values near zero off by a rounding step of the tensor's scale are no
    failure; errors in many values are, whether in one feed or spread over all."""
    rng = np.random.default_rng(0)
    refs = [rng.standard_normal((1, 1, 64)).astype(np.float32) for _ in range(6)]
    near_zero = [r.copy() for r in refs]
    near_zero[0][0, 0, :2] = 1.25e-3
    one_off = [r.copy() for r in near_zero]
    one_off[0][0, 0, :2] = 1.48e-3  # 2.3e-4 off: one fp16 step at magnitude 0.4, 10% of these values
    assert check._stat_failure(near_zero[0], one_off[0], "float16") is not None  # alone, p99 of 64 values fails
    assert _judged(near_zero, one_off) == []
    spread = [r * np.float32(1.08) for r in refs]  # 8% off everywhere: every feed's median, and the pool, fail
    failures = _judged(refs, spread)
    assert sum("(feed " in f and "median rel" in f for f in failures) == 6 and "384 in all" in failures[-1]
    tail = [r.copy() for r in refs]
    for t in tail:
        t[0, 0, 0] *= 1.2  # 1 of 64 values (1.6%) 20% off in every feed: only the pooled 99th percentile sees it
    (failure,) = _judged(refs, tail)
    assert failure.startswith("onnxruntime: h (6 feeds of under 100 values, 384 in all): p99 rel")


def test_exact_tolerance_judges_every_value():
    ref = np.linspace(-1, 1, 200).astype(np.float32)
    assert _judged([ref], [ref + 5e-5], stats=None, tol=1e-4) == []
    (failure,) = _judged([ref], [ref + 5e-4], stats=None, tol=1e-4)
    assert "beyond atol/rtol 0.0001" in failure


def test_fp16_artifact_passes_the_statistical_comparison(fp16_artifact, tmp_path, capsys):
    from btp.compiler.build import BuildConfig, compile_artifact, resolve_backend
    from btp.compiler.export import Limits

    out = fp16_artifact  # the session's ONNX Runtime build (test_io_binding's too): what `auto` builds here
    if resolve_backend("auto") != "onnxruntime":  # pragma: no cover - where TensorRT is, `auto` builds engines
        out = tmp_path / "f16"
        compile_artifact(BuildConfig(model="builtin:tiny-llava", plan="btp", out=out, dtype="float16",
                                     limits=Limits(max_prompt=256, max_new_tokens=16)))
    assert check_cli.main([str(out), "--samples", "2", "--max-new-tokens", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "float16" and report["passed"]
    worst = max(max(g["worst"].values(), default=0.0) for g in report["graphs"])
    assert 0 < worst < 1e-2  # fp16 is not exact, and is judged by statistics rather than 1e-4


def test_tensorrt_skip_reasons(monkeypatch):
    with_engines = SimpleNamespace(engines={"head": "engines/head.engine"}, tensorrt="10.9.0")
    assert "no TensorRT engines" in check.tensorrt_skip_reason(SimpleNamespace(engines={}, tensorrt=None))
    monkeypatch.setattr(check, "tensorrt_version", lambda: None)
    assert check.tensorrt_skip_reason(with_engines) == "tensorrt is not importable here"
    monkeypatch.setattr(check, "tensorrt_version", lambda: "10.13.0")
    assert "built by TensorRT 10.9.0, this is TensorRT 10.13.0" in check.tensorrt_skip_reason(with_engines)
    monkeypatch.setattr(check, "tensorrt_version", lambda: "10.9.0")
    assert check.tensorrt_skip_reason(with_engines) is None


def test_captured_feeds_split_into_the_prefill_and_decode_profiles(artifact, tiny, images):
    from btp.compiler import reference_pipeline
    from btp.compiler.plan import Plan
    from btp.compiler.trt_profiles import manifest_profiles

    m = read_manifest(artifact("btp"))
    ref = reference_pipeline(tiny, Plan.parse(m.plan), max_positions=m.chain.max_positions)
    feeds = check.capture_feeds(ref, [(images, ["What is shown?", "Describe the picture."])], steps=3)
    for name in m.graphs:
        groups, unfit = check.group_by_profile(feeds[name], manifest_profiles(m, name))
        assert unfit == [], name
        if name.startswith("stage") or name == "embed":  # one prefill call, then one call per decode step
            assert [len(groups[0]), len(groups[1])] == [1, 2], name
            assert all(f["inputs_embeds" if name != "embed" else "input_ids"].shape[1] == 1
                       for f in (feeds[name][i] for i in groups[1]))
        else:  # one profile: vision and prune graphs run in prefill only, head at every step
            assert list(groups) == [0] and len(groups[0]) == (3 if name == "head" else 1), name
    too_big = dict(feeds["stage1"][-1])
    too_big["inputs_embeds"] = too_big["inputs_embeds"].repeat(m.build.max_batch, 1, 1)  # batch 8 > 4
    assert check.group_by_profile([too_big], manifest_profiles(m, "stage1")) == ({}, [0])


def test_table_names_the_runners_and_why_tensorrt_was_skipped(capsys):
    graph = {"graph": "head", "feeds": 4, "passed": True, "worst": {"logits": 1e-6}, "ties": 0, "failures": [],
             "runners": ["onnxruntime", "tensorrt"], "errors": {"onnxruntime": {"logits": 1e-6},
                                                                "tensorrt": {"logits": 2e-4}},
             "profile_feeds": [4]}
    report = {"artifact": "a", "graphs": [graph], "samples": 1, "passed": True, "pipeline_backend": "tensorrt",
              "tokens": {"mean": 1.0}, "runners": ["torch", "onnxruntime", "tensorrt"], "tensorrt_skipped": None}
    check_cli.print_report(report)
    out = capsys.readouterr().out
    assert "ort 1.00e-06 / trt 2.00e-04" in out and "runners: torch, onnxruntime, tensorrt" in out
    assert "skipped" not in out and "(tensorrt pipeline)" in out
    graph.update(runners=["onnxruntime"], profile_feeds=[], errors={"onnxruntime": {"logits": 1e-6}})
    report.update(runners=["torch", "onnxruntime"], tensorrt_skipped="tensorrt is not importable here",
                  pipeline_backend="onnxruntime")
    check_cli.print_report(report)
    assert "runners: torch, onnxruntime; tensorrt skipped: tensorrt is not importable here" in capsys.readouterr().out


HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="tensorrt is not importable here (it needs an NVIDIA GPU host)")
def test_check_runs_tensorrt_engines_per_profile(tmp_path, capsys):  # pragma: no cover - GPU hosts only
    from btp.compiler.build import BuildConfig, compile_artifact
    from btp.compiler.export import Limits

    out = tmp_path / "trt"
    compile_artifact(BuildConfig(model="builtin:tiny-llava", plan="btp", out=out, backend="tensorrt",
                                 limits=Limits(max_prompt=256, max_new_tokens=16), workspace_gib=1.0))
    assert read_manifest(out).build.workspace_gib == 1.0
    code = check_cli.main([str(out), "--samples", "2", "--max-new-tokens", "3", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["runners"] == ["torch", "onnxruntime", "tensorrt"] and report["tensorrt_skipped"] is None
    assert report["pipeline_backend"] == "tensorrt"
    graphs = {g["graph"]: g for g in report["graphs"]}
    assert all(n > 0 for n in graphs["stage1"]["profile_feeds"]) and len(graphs["stage1"]["profile_feeds"]) == 2
    assert code == 0 and report["passed"], [g["failures"][:2] for g in report["graphs"] if not g["passed"]]
