"""btp-bench on the tiny artifact: the report's structure and ratios (no speed is asserted: noisy machines)."""

import json

import pytest
import torch
from PIL import Image

from btp.cli import bench as bench_cli
from btp.runtime.dependencies import importable
from btp.tools import bench


def test_bench_reports_ratios_against_unpruned_and_hugging_face(artifact, tmp_path, capsys):
    png = tmp_path / "bench.png"
    code = bench_cli.main([str(artifact("btp")), "--repeat", "1", "--max-new-tokens", "3", "--prompt-tokens", "8",
                       "--json", "--plot", str(png)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    for run in ("pruned", "unpruned"):
        assert report[run]["ttft_ms"] > 0 and report[run]["decode_tokens_per_s"] > 0
        assert "stage0" in report[run]["prefill_ms"]
    assert set(report["pruned"]["prefill_ms"]) > {"prune1", "prune2", "vision", "head"}
    assert report["hf"]["ttft_ms"] > 0
    r = report["ratios"]
    assert r["speedup"] == report["unpruned"]["ttft_ms"] / report["pruned"]["ttft_ms"]
    f = report["flops"]
    assert abs(r["efficiency"] - r["speedup"] / f["ideal_ttft_speedup"]) < 1e-12
    assert abs(r["decoder_efficiency"] - r["decoder_speedup"] / f["ideal_speedup"]) < 1e-12
    # The vision tower is a cost no plan prunes, so the whole-prefill ideal is below the decoder's.
    assert 1 < f["ideal_ttft_speedup"] < f["ideal_speedup"] and f["fixed"] > 0
    assert report["text_tokens"] == report["prompt_tokens"] - 64
    assert 0 < r["prune_overhead"] < 1
    # Pruning shrinks the KV cache: fewer tokens in every stage from the first boundary on.
    assert r["kv_cache_reduction"] > 1.2
    assert report["flops"]["ideal_speedup"] > 1
    assert report["environment"]["cpu_count"] >= 1
    with Image.open(png) as im:
        assert im.width > 500


def test_bench_bad_baseline_exits_2(artifact, capsys):
    assert bench_cli.main([str(artifact("btp")), "--baseline", "trt"]) == 2
    assert "--baseline takes unpruned and/or hf" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--backend", "tensorrt"], "tensorrt is not installed"),
    (["--device", "cuda"], "device cuda: torch"),
    (["--sweep", "presets", "--device", "cuda:0"], "--sweep measures ONNX Runtime on the CPU only"),
])
def test_bench_backend_and_device_it_cannot_use_exit_2(artifact, capsys, args, message):
    if "cuda" in " ".join(args) and "--sweep" not in args and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    if "tensorrt" in args and importable("tensorrt"):
        pytest.skip("tensorrt is importable here")
    assert bench_cli.main([str(artifact("btp")), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("btp-bench: error: ") and message in err[0]


def test_sweep_presets_measures_each_plan(artifact, tmp_path, capsys):
    out = artifact("btp")
    png = tmp_path / "sweep.png"
    code = bench_cli.main([str(out), "--sweep", "presets", "--plans", "btp,none", "--repeat", "1", "--prompt-tokens",
                       "8", "--json", "--plot", str(png)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    points = {p["plan"]: p for p in report["points"]}
    assert set(points) == {"btp", "none"}
    assert points["none"]["layer_averaged_image_tokens"] == 64
    assert points["btp"]["layer_averaged_image_tokens"] < 64
    assert points["btp"]["flops"] < points["none"]["flops"]
    assert all(p["ttft_ms"] > 0 for p in points.values())
    with Image.open(png) as im:
        assert im.width > 400


def test_budget_sweep_plans_hit_their_shares():
    from btp.compiler import load_model

    model = load_model("builtin:tiny-llava")
    plans = bench.sweep_plans("budgets", model, ["0.15", "0.22", "0.3", "0.05"])
    assert set(plans) == {"none", "btp@0.15", "btp@0.22", "btp@0.3"}  # 0.05 is below the first cut's floor
    for share in (0.15, 0.22, 0.3):
        assert abs(plans[f"btp@{share:g}"].average_image_tokens() / 64 - share) < 0.01


def test_sweep_bad_arguments_exit_2(artifact, capsys):
    assert bench_cli.main([str(artifact("btp")), "--sweep", "budgets", "--plans", "half"]) == 2
    assert "--plans with --sweep budgets takes shares" in capsys.readouterr().err
    assert bench_cli.main([str(artifact("btp")), "--plans", "btp"]) == 2
    assert "--plans goes with --sweep" in capsys.readouterr().err


@pytest.mark.parametrize(("backend", "tf32", "expected"), [
    ("onnxruntime", True, False),  # an ONNX Runtime twin of a --tf32 TensorRT artifact takes no TF32 flag
    ("tensorrt", True, True), ("tensorrt", False, False), ("tensorrt", None, True),  # None: built before the field
])
def test_the_twin_is_built_like_the_artifact(tmp_path, monkeypatch, backend, tf32, expected):
    from types import SimpleNamespace

    import btp.compiler.build as build

    seen = []
    monkeypatch.setattr(build, "compile_artifact", lambda cfg: seen.append(cfg))
    from btp.runtime.chain import Bounds

    b = SimpleNamespace(dtype="float32", opset=18, max_batch=2, max_prompt=128, max_new_tokens=8, tf32=tf32,
                        bounds=Bounds(2, 128, 8))
    manifest = SimpleNamespace(build=b, model=SimpleNamespace(fingerprint="f" * 16, name="builtin:tiny-llava"))
    bench.unpruned_twin(tmp_path / "art", manifest, log=lambda m: None, backend=backend)
    assert seen[0].backend == backend and seen[0].tf32 is expected
