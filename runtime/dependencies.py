"""Optional packages and devices: import them where they are needed, or say in one line what to install.

The backends are extras of the `btp` package (`cpu`: onnxruntime, `gpu`: onnxruntime-gpu and tensorrt), so
a user who installed neither must be told which one to pick, not shown a `ModuleNotFoundError`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from .errors import DependencyError

# module -> (what it does for btp, how to install it)
OPTIONAL = {
    "onnxruntime": ("runs the graphs with ONNX Runtime",
                    "pip install 'btp[cpu]' (or 'btp[gpu]' for onnxruntime-gpu on a CUDA host)"),
    "tensorrt": ("builds and runs TensorRT engines", "pip install 'btp[gpu]' on a CUDA host"),
}


def require(module: str) -> ModuleType:
    """Import one of the optional packages in `OPTIONAL`, or raise `DependencyError` naming its extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        what, how = OPTIONAL[module]
        raise DependencyError(f"{module} is not installed ({what}): install it with {how}") from err


def importable(module: str) -> bool:
    """Whether an optional package imports here (`require` would succeed)."""
    try:
        require(module)
    except DependencyError:
        return False
    return True


def require_device(device: str | torch.device) -> torch.device:
    """`device` as a `torch.device`, or `DependencyError` when it is a CUDA device this machine cannot use."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DependencyError(f"device must be cpu, cuda or cuda:N, got {device!r}") from err
    if dev.type not in ("cpu", "cuda"):
        raise DependencyError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise DependencyError(f"{device}: torch {torch.__version__} ({build}) sees no CUDA device; run on a GPU "
                                  "host with a CUDA build of torch, or use cpu", option="device")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DependencyError(f"device {device}: this machine has {count} CUDA device(s), "
                                  f"cuda:0 to cuda:{count - 1}")
    return dev
