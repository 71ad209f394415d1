"""btp-bench on the tiny artifact: the report's structure and ratios (no speed is asserted: noisy machines)."""

import json

from PIL import Image

from btp.tools import bench


def test_bench_reports_ratios_against_unpruned_and_hugging_face(artifact, tmp_path, capsys):
    png = tmp_path / "bench.png"
    code = bench.main([str(artifact("btp")), "--repeat", "1", "--new-tokens", "3", "--prompt-tokens", "8",
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
    assert abs(r["efficiency"] - r["speedup"] / report["flops"]["ideal_speedup"]) < 1e-12
    assert 0 < r["prune_overhead"] < 1
    # Pruning shrinks the KV cache: fewer tokens in every stage from the first boundary on.
    assert r["kv_cache_reduction"] > 1.2
    assert report["flops"]["ideal_speedup"] > 1
    assert report["environment"]["cpu_count"] >= 1
    with Image.open(png) as im:
        assert im.width > 500


def test_bench_bad_baseline_exits_2(artifact, capsys):
    assert bench.main([str(artifact("btp")), "--baseline", "trt"]) == 2
    assert "--baseline takes unpruned and/or hf" in capsys.readouterr().err
