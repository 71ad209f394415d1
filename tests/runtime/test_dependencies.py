"""A missing backend package or device is an input error: one line naming the package and the extra, exit 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from btp.runtime import DependencyError, Pipeline
from btp.runtime.dependencies import importable, require, require_device

SCENE = "tools/data/toy-scene.png"
HAS_TRT = importable("tensorrt")


@pytest.fixture(scope="module")
def art(artifact):
    """The btp artifact of builtin:tiny-llava, compiled before any test takes onnxruntime away."""
    return str(artifact("btp"))


@pytest.fixture
def no_onnxruntime(monkeypatch):
    """This process without onnxruntime: `import onnxruntime` raises ImportError, as where it is not installed."""
    for name in [m for m in sys.modules if m == "onnxruntime" or m.startswith("onnxruntime.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)


@pytest.fixture(scope="module")
def shadow_env(tmp_path_factory):
    """Environment for a subprocess in which onnxruntime cannot be imported: a module earlier on the path that
    fails the way a missing package does."""
    root = tmp_path_factory.mktemp("no-onnxruntime")
    (root / "onnxruntime.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'onnxruntime'\", name='onnxruntime')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _cli(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _one_line_error(proc, prog: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


def test_require_names_the_extra(no_onnxruntime):
    with pytest.raises(DependencyError) as err:
        require("onnxruntime")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("onnxruntime is not installed") and "pip install 'btp[cpu]'" in msg
    assert not importable("onnxruntime")


def test_pipeline_load_without_onnxruntime_raises_dependency_error(art, no_onnxruntime):
    with pytest.raises(DependencyError, match=r"onnxruntime is not installed .*pip install 'btp\[cpu\]'"):
        Pipeline.load(art, backend="onnxruntime")
    with pytest.raises(DependencyError, match="onnxruntime is not installed"):
        Pipeline.load(art)  # auto: no engines in this artifact, so ONNX Runtime


@pytest.mark.parametrize("prog", ["btp-run", "btp-check", "btp-bench"])
def test_clis_without_onnxruntime_exit_2_with_one_line(art, shadow_env, prog):
    args = {"btp-run": ["--image", SCENE, "--prompt", "Hi"], "btp-check": [], "btp-bench": []}[prog]
    proc = subprocess.run([_cli(prog), art, *args], env=shadow_env, capture_output=True,
                          text=True, timeout=300)
    line = _one_line_error(proc, prog)
    assert "onnxruntime is not installed" in line and "pip install 'btp[cpu]'" in line


def test_compile_check_without_onnxruntime_fails_before_building(tmp_path, shadow_env):
    out = tmp_path / "art"
    proc = subprocess.run([_cli("btp-compile"), "builtin:tiny-llava", "--plan", "btp", "-o", str(out), "--check",
                           "--backend", "onnxruntime"], env=shadow_env, capture_output=True, text=True, timeout=300)
    line = _one_line_error(proc, "btp-compile")
    assert "pip install 'btp[cpu]'" in line
    assert not out.exists() and not list(tmp_path.iterdir())


def test_shadowed_onnxruntime_really_fails_to_import(shadow_env):
    """The subprocess tests above mean something only if the import fails there."""
    proc = subprocess.run([sys.executable, "-c", "import onnxruntime"], env=shadow_env, capture_output=True, text=True)
    assert proc.returncode == 1 and "ModuleNotFoundError: No module named 'onnxruntime'" in proc.stderr


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is importable here")
def test_compile_for_tensorrt_without_it_names_the_gpu_extra(capsys, tmp_path):
    from btp.cli.compile import main

    out = tmp_path / "trt"
    assert main(["builtin:tiny-llava", "--plan", "btp", "-o", str(out), "--backend", "tensorrt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensorrt is not installed" in err[0] and "pip install 'btp[gpu]'" in err[0]
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_device_without_cuda_is_a_one_line_error(art, capsys):
    from btp.cli import run

    with pytest.raises(DependencyError, match="sees no CUDA device"):
        require_device("cuda")
    with pytest.raises(DependencyError, match="sees no CUDA device"):
        Pipeline.load(art, device="cuda:0")
    assert run.main([art, "--image", SCENE, "--prompt", "Hi", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "btp-run: error: --device cuda: torch" in err[0]  # the CLI names its flag


@pytest.mark.parametrize("device", ["tpu", "gpu0", "cuda:x"])
def test_unknown_device_names_the_expected_form(device):
    with pytest.raises(DependencyError, match="device must be cpu, cuda or cuda:N"):
        require_device(device)
