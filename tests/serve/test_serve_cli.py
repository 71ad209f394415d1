"""The btp-serve command: a child process that announces where it listens, drains an answer in flight on SIGTERM
and exits 0; --check-config and --export-triton print their JSON; bad options are one line and exit 2; and the
load benchmark's report."""

import http.client
import json
import signal
import subprocess
import sys

import pytest
from serving import chat, data_url

from btp.cli import bench_serve as bench
from btp.cli import serve as cli
from btp.serve.bench import free_port


def test_sigterm_drains_the_answer_in_flight_then_exits_0(toy_artifact, scene_png):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "btp.cli.serve", str(toy_artifact), "--port", str(port),
                             "--model-name", "toy", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        info = json.loads(proc.stdout.readline())
        assert info["url"] == f"http://127.0.0.1:{port}/v1" and info["model"] == "toy" and info["max_batch"] == 8
        body = chat(data_url(scene_png), text="Describe the scene.", max_tokens=64, min_tokens=64, stream=True)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        events = [line[6:].strip() for line in resp if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(bool(c["choices"][0]["delta"].get("content")) for c in chunks) > 10
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_check_config_and_export_print_json(toy_artifact, tmp_path, capsys):
    assert cli.main([str(toy_artifact), "--check-config", "--max-batch", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["max_batch"] == 4 and doc["max_tokens"] == 64 and doc["model"] == "toy"
    assert cli.main([str(toy_artifact), "--export-triton", str(tmp_path / "repo"), "--instances", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["files"] == ["toy/1/model.py", "toy/config.pbtxt"] and doc["instances"] == 2
    assert "count: 2 kind: KIND_CPU" in (tmp_path / "repo/toy/config.pbtxt").read_text()
    assert cli.main([str(toy_artifact), "--export-triton", str(tmp_path / "repo")]) == 2  # the model is there
    assert "expected no model 'toy' there yet" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "words"), [
    (["--max-batch", "9"], "--max-batch: expected 1..8 (the artifact's max batch), found 9"),
    (["--max-queue", "0"], "--max-queue: expected a positive value, found 0"),
    (["--port", "70000"], "--port: expected 0..65535, found 70000"),
])
def test_bad_options_are_one_line_and_exit_2(toy_artifact, argv, words, capsys):
    assert cli.main([str(toy_artifact), "--check-config", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"btp-serve: error: {words}"]


def test_the_load_benchmark_reports_both_runs(toy_artifact, capsys):
    assert bench.main([str(toy_artifact), "--clients", "2", "--requests", "4", "--max-new-tokens", "4",
                       "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    one, two = report["runs"]
    assert (one["clients"], two["clients"]) == (1, 2) and one["requests"] == two["requests"] == 4
    for run in (one, two):  # every answer is exactly 4 tokens (min_tokens)
        assert run["output_tokens_per_s"] == pytest.approx(16 / run["seconds"], rel=0.01)
        assert 0 < run["ttft_p50_ms"] <= run["ttft_p99_ms"]
    assert report["ratios"]["output_tokens_per_s"] == pytest.approx(
        two["output_tokens_per_s"] / one["output_tokens_per_s"], abs=0.01)
