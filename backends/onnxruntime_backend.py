"""ONNX Runtime backend: one `InferenceSession` per graph behind the name-keyed `run(feeds) -> outputs`.

Inputs are bound straight from torch tensors (I/O binding on their memory, no copy); outputs stay in
ONNX Runtime memory on the device until the chain reads them. CPU execution provider here, CUDA where
onnxruntime-gpu is installed. Sessions are safe to share between threads; each call makes its own binding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from btp.runtime.dependencies import require, require_device
from btp.runtime.errors import ArtifactError, DependencyError

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(bfloat16)": torch.bfloat16,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(bool)": torch.bool,
}
# torch dtype -> ONNX element type (`onnx.TensorProto`): what `IOBinding.bind_input` takes for types numpy lacks
# (bfloat16), so every input binds the same way on every device.
ELEMENT_TYPES = {
    torch.float32: 1, torch.int32: 6, torch.int64: 7, torch.bool: 9, torch.float16: 10, torch.bfloat16: 16,
}


@dataclass(frozen=True)
class SessionOptions:
    """What `Pipeline.load` lets a user set: threads (0 = ONNX Runtime's choice), the graph optimization
    level (`disable`, `basic`, `extended`, `all`) and whether idle worker threads spin.

    Spinning is off by default: a chain runs many sessions one after another, each with its own thread
    pool, and the pools that just finished would otherwise spin on the cores the next session needs (on
    2 cores this doubled the time of every stage graph and cut decode speed by a third).
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    optimization: str = "all"
    spinning: bool = False


class OrtEngine:
    """One graph in ONNX Runtime. `device` is where its inputs and outputs live (cpu or cuda:N)."""

    def __init__(self, path: str | Path, options: SessionOptions | None = None, device: str = "cpu"):
        ort = require("onnxruntime")
        options = options or SessionOptions()

        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if options.optimization not in levels:
            raise ValueError(f"optimization must be one of {sorted(levels)}, got {options.optimization!r}")
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[options.optimization]
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.log_severity_level = 3
        if not options.spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.device = require_device(device)
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise DependencyError(f"device {device}: onnxruntime {ort.__version__} has no CUDAExecutionProvider; "
                                      "replace it with onnxruntime-gpu: pip uninstall onnxruntime && "
                                      "pip install 'btp[gpu]'")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as err:  # ONNX Runtime raises its own exception types for unreadable models
            raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({str(err).splitlines()[0][:200]})") from err
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_types = {i.name: _ORT_TYPES.get(i.type) for i in self.session.get_inputs()}
        self.output_types = {o.name: _ORT_TYPES.get(o.type) for o in self.session.get_outputs()}
        # Each dim as the graph declares it: an int, a symbolic name, or None where the graph says nothing.
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.shapes = {t.name: list(t.shape) for t in [*self.session.get_inputs(), *self.session.get_outputs()]}
        self._ort_device = "cuda" if self.device.type == "cuda" else "cpu"

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Name-keyed torch tensors on `device` -> name-keyed torch tensors on `device`."""
        binding = self.session.io_binding()
        keep = []  # contiguous copies must outlive the run
        for name in self.input_names:
            t = feeds[name]
            want = self.input_types[name]
            if want is not None and t.dtype != want:
                raise TypeError(f"{self.path.name}: input {name} must be {want}, got {t.dtype}")
            if t.device != self.device:
                raise TypeError(f"{self.path.name}: input {name} must be on {self.device}, got {t.device}")
            t = t.contiguous()
            keep.append(t)
            self._bind(binding, name, t)
        for name in self.output_names:
            binding.bind_output(name, self._ort_device, self.device.index or 0)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch kernels are ready
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return {name: self._to_torch(v) for name, v in zip(self.output_names, outs)}

    def _bind(self, binding, name: str, t: torch.Tensor) -> None:
        """Bind a contiguous tensor by its pointer, typed with its ONNX element type (bf16 included)."""
        element = ELEMENT_TYPES.get(t.dtype)
        if element is None:
            raise TypeError(f"{self.path.name}: cannot bind {t.dtype} input {name}")
        binding.bind_input(name, self._ort_device, self.device.index or 0, element, list(t.shape), t.data_ptr())

    @staticmethod
    def _to_torch(value) -> torch.Tensor:
        """An output `OrtValue` -> a torch tensor on its device sharing its memory (DLPack; any dtype)."""
        return torch.from_dlpack(value)
