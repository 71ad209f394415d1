"""The GPU runbook refuses, in one line, to run where it cannot."""

import pytest
import torch

from btp.cli import gpu_check as gpu_check_cli
from btp.tools import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_check_without_cuda_is_a_one_line_error(capsys, tmp_path):
    assert gpu_check_cli.main(["--out", str(tmp_path / "r.json"), "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("btp-gpu-check: error: device cuda: torch") and "no CUDA" in err[0]
    assert not (tmp_path / "r.json").exists()


def test_environment_names_the_backends_present():
    env = gpu_check.environment()
    assert env["torch"] == torch.__version__ and env["onnxruntime"] and "CPUExecutionProvider" in env["providers"]
