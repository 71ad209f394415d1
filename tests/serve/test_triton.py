"""The pipeline as a Triton Inference Server model, asked with the real `tritonclient` over HTTP: served through
PyTriton by `btp-serve --triton`, and exported as a model repository that the Triton server binary PyTriton ships runs
as it is (its Python backend calls the repository's `model.py`: `initialize`, then `execute` per batch)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from serving import ANSWER, QUESTION

from btp.serve.bench import free_port
from btp.serve.triton import export_triton

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402 - after the skip


def infer(port: int, model: str, images: list[bytes], prompts: list[str], max_tokens: list[int]):
    """One request of len(images) rows -> (texts, completion token counts)."""
    client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        arrays = [("image", np.array([[i] for i in images], dtype=object), "BYTES"),
                  ("prompt", np.array([[p.encode()] for p in prompts], dtype=object), "BYTES"),
                  ("max_tokens", np.array([[m] for m in max_tokens], dtype=np.int32), "INT32")]
        inputs = []
        for name, array, kind in arrays:
            inputs.append(tritonclient_http.InferInput(name, list(array.shape), kind))
            inputs[-1].set_data_from_numpy(array)
        result = client.infer(model, inputs)
        return [t.decode() for t in result.as_numpy("text")[:, 0]], result.as_numpy("completion_tokens")[:, 0].tolist()
    finally:
        client.close()


def check_model(port: int, model: str, scene_png: bytes):
    """The answers, one request of two rows and four concurrent requests, and a bad image refused by name."""
    texts, counts = infer(port, model, [scene_png] * 2, [QUESTION, QUESTION], [8, 1])
    assert texts == [ANSWER, "bottom"] and counts == [3, 1]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: infer(port, model, [scene_png], [QUESTION], [8]), range(4)))
    assert answers == [([ANSWER], [3])] * 4
    with pytest.raises(InferenceServerException) as err:
        infer(port, model, [b"not an image"], [QUESTION], [8])
    assert "row 0: image: not a readable image" in str(err.value)
    return err.value


def test_btp_serve_triton_serves_through_pytriton_and_stops_on_sigterm(toy_artifact, scene_png):
    port = free_port()  # HTTP; gRPC and metrics on the next two
    proc = subprocess.Popen([sys.executable, "-m", "btp.cli.serve", str(toy_artifact), "--triton", "--port",
                             str(port), "--model-name", "toy", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        info = json.loads(proc.stdout.readline())  # once Triton has the model; its log went to stderr
        assert info["triton"] and info["url"] == f"http://127.0.0.1:{port}" and info["max_batch"] == 8
        err = check_model(port, "toy", scene_png)
        assert "PyTritonBadParameterError" in str(err)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0 and proc.stdout.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stock_triton(repo: Path, work: Path, ports: list[int]) -> subprocess.Popen:
    """The Triton server binary that nvidia-pytriton ships, on `repo`, as PyTriton lays it out: the Python
    backend's stub for this interpreter beside the backend, this interpreter's LIBDIR and PyTriton's libraries on
    LD_LIBRARY_PATH, this environment's bin first on PATH (the stub's Python finds btp there)."""
    import pytriton

    dist = Path(pytriton.__file__).parent / "tritonserver"
    shutil.copytree(dist / "backends", work / "backends")
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    shutil.copy(dist / "python_backend_stubs" / version / "triton_python_backend_stub", work / "backends" / "python")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    libs = [sysconfig.get_config_var("LIBDIR"), str(dist.parent.parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, os.environ.get("LD_LIBRARY_PATH", "")])
    cmd = [str(dist / "bin" / "tritonserver"), f"--model-repository={repo}", f"--backend-directory={work}/backends",
           "--http-address=127.0.0.1", f"--http-port={ports[0]}", f"--grpc-port={ports[1]}",
           f"--metrics-port={ports[2]}", "--exit-timeout-secs=5"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "triton.log", "wb"))


def test_the_exported_repository_runs_on_a_stock_triton_server(toy_artifact, scene_png, tmp_path):
    repo = tmp_path / "repo"
    doc = export_triton(toy_artifact, repo, "btp-toy", max_batch=8, wait_us=2000, instances=1, threads=2)
    assert doc["files"] == ["btp-toy/1/model.py", "btp-toy/config.pbtxt"]
    assert json.loads((repo / "btp-toy/1/artifact/manifest.json").read_text())["build"]["max_batch"] == 8
    config = (repo / "btp-toy/config.pbtxt").read_text()
    assert "max_batch_size: 8" in config and "max_queue_delay_microseconds: 2000" in config
    assert 'backend: "python"' in config and "count: 1 kind: KIND_CPU" in config
    ports = [free_port() for _ in range(3)]
    server = stock_triton(repo, tmp_path, ports)
    try:
        client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{ports[0]}")
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "triton.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the model did not load"
            try:
                if client.is_model_ready("btp-toy"):
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.2)
        client.close()
        err = check_model(ports[0], "btp-toy", scene_png)
        assert err.status() == "400"  # the model's INVALID_ARG
    finally:
        server.terminate()
        server.wait(30)
