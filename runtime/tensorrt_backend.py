"""TensorRT backend: one deserialized engine per graph, one execution context per optimization profile.

Written against the TensorRT 10/11 Python API (`set_input_shape`, `set_tensor_address`,
`execute_async_v3`); tensors are torch CUDA tensors, so the chain's KV caches stay on the device and the
engines run on torch's current stream, ordered with the chain's own torch ops. Not importable without
the `tensorrt` package; nothing here runs on the project's CPU machines.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from .errors import ArtifactError


def tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt.__version__


class TrtEngine:
    """A serialized TensorRT engine behind the name-keyed `run(feeds) -> outputs` contract."""

    def __init__(self, path: str | Path, built_with: str | None = None, device: str = "cuda"):
        import tensorrt as trt

        self.path = Path(path)
        if built_with is not None and built_with != trt.__version__:
            raise ArtifactError(f"{self.path}: built by TensorRT {built_with}, this is TensorRT {trt.__version__}; "
                                "rebuild the artifact with btp-compile --backend tensorrt")
        self._trt = trt
        self.device = torch.device(device)
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"{self.path}: TensorRT cannot deserialize this engine")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        self.input_names = [n for n in names if mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if mode(n) == trt.TensorIOMode.OUTPUT]
        self.contexts = []
        for p in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(p, torch.cuda.current_stream(self.device).cuda_stream)
            self.contexts.append(ctx)
        self._ranges = [{n: self.engine.get_tensor_profile_shape(n, p) for n in self.input_names}
                        for p in range(len(self.contexts))]
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._lock = threading.Lock()  # an execution context serves one call at a time
        self._dummy = torch.zeros(1, dtype=torch.uint8, device=self.device)  # address for empty tensors

    def _profile(self, feeds: dict[str, torch.Tensor]) -> int:
        for p, ranges in enumerate(self._ranges):
            if all(all(lo <= s <= hi for s, lo, hi in zip(feeds[n].shape, r[0], r[2])) for n, r in ranges.items()):
                return p
        shapes = {n: tuple(feeds[n].shape) for n in self.input_names}
        raise ValueError(f"{self.path.name}: input shapes {shapes} fit none of the engine's profiles")

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self._lock:
            ctx = self.contexts[self._profile(feeds)]
            keep = []
            for n in self.input_names:
                t = feeds[n].to(self.device, self._dtypes[n]).contiguous()
                keep.append(t)
                ctx.set_input_shape(n, tuple(t.shape))
                ctx.set_tensor_address(n, t.data_ptr() if t.numel() else self._dummy.data_ptr())
            outputs = {}
            for n in self.output_names:
                shape = tuple(ctx.get_tensor_shape(n))
                out = torch.empty(shape, dtype=self._dtypes[n], device=self.device)
                ctx.set_tensor_address(n, out.data_ptr() if out.numel() else self._dummy.data_ptr())
                outputs[n] = out
            if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
                raise RuntimeError(f"{self.path.name}: TensorRT execution failed")
            return outputs


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}
    return table[dtype]
