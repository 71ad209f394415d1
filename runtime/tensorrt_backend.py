"""TensorRT backend: one deserialized engine per graph, one execution context per optimization profile.

Written against the TensorRT 10/11 Python API (`set_input_shape`, `set_tensor_address`,
`execute_async_v3`); tensors are torch CUDA tensors, so the chain's KV caches stay on the device and the
engines run on torch's current stream, ordered with the chain's own torch ops. `TrtEngine` needs the
`tensorrt` package and a GPU; the rules it follows (which profile a call uses, which inputs are copied,
which output buffers are reused) are plain functions here, importable and tested without either.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .dependencies import require, require_device
from .errors import ArtifactError

ALIGNMENT = 256  # bytes: TensorRT's setTensorAddress asks for pointers with at least 256-byte alignment

# Outputs the chain consumes before it calls the same engine again (in the same thread): their device
# buffers are reused across calls. `present.*` (the KV caches the chain keeps as the next step's past),
# `logits` (kept across steps by `generate(output_logits=True)` and returned by `Pipeline.prefill`) and any
# output not named here get a fresh buffer on every call.
REUSED_OUTPUTS = frozenset({
    "image_features", "inputs_embeds", "hidden_states", "scores",
    "pruned_hidden_states", "pruned_position_ids", "pruned_attention_mask", "keep_indices",
})
POOL_ENTRIES = 4  # reused buffers kept per engine and thread (least recently used goes first)

Range = Sequence[Sequence[int]]  # (min, opt, max) shapes of one input in one profile


def tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt.__version__


def fit_profile(shapes: Mapping[str, Sequence[int]], ranges: Sequence[Mapping[str, Range]]) -> int | None:
    """Index of the first optimization profile whose [min, max] range holds every input's shape, else None.

    `ranges[p][name]` is the (min, opt, max) shapes of input `name` in profile `p`: what
    `btp.compiler.trt_profiles.profiles` builds the engines with, or what the engine itself reports.
    """
    for p, profile in enumerate(ranges):
        if all(name in shapes and _within(shapes[name], r[0], r[2]) for name, r in profile.items()):
            return p
    return None


def _within(shape: Sequence[int], lo: Sequence[int], hi: Sequence[int]) -> bool:
    return len(shape) == len(lo) == len(hi) and all(a <= s <= b for s, a, b in zip(shape, lo, hi))


def reuses_buffer(output: str) -> bool:
    """Does `TrtEngine` write output `output` into a buffer it reuses across calls (see REUSED_OUTPUTS)?"""
    return output in REUSED_OUTPUTS


def buffer_key(output: str, shape: Sequence[int]) -> tuple:
    """The shape class of a reused output buffer: calls producing `output` with this shape share it.

    Keyed by the output's own shape rather than by every input's: a stage's decode inputs change shape at
    every step (the past grows by one) while its `hidden_states` output keeps its [batch, 1, hidden] shape.
    """
    return output, tuple(int(d) for d in shape)


class OutputPool:
    """Reused output buffers, per thread: an LRU of at most `entries` buffers keyed by `buffer_key`.

    Per thread because one `Pipeline` serves concurrent `generate` calls: two threads never share a buffer,
    and within one thread the chain reads a reused output before it runs the same engine again.
    """

    def __init__(self, entries: int = POOL_ENTRIES):
        self.entries = entries
        self._local = threading.local()

    def _lru(self) -> OrderedDict:
        lru = getattr(self._local, "lru", None)
        if lru is None:
            lru = self._local.lru = OrderedDict()
        return lru

    def get(self, output: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        lru, key = self._lru(), buffer_key(output, shape)
        buf = lru.get(key)
        if buf is not None and buf.dtype == dtype and buf.device == device:
            lru.move_to_end(key)
            return buf
        buf = torch.empty(key[1], dtype=dtype, device=device)
        lru[key] = buf
        lru.move_to_end(key)
        while len(lru) > self.entries:
            lru.popitem(last=False)
        return buf

    def __len__(self) -> int:
        return len(self._lru())


def engine_input(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`t` as the engine reads it: `t` itself when it is already on `device`, of `dtype`, contiguous and
    256-byte aligned (no copy); otherwise one copy into a fresh tensor. Empty tensors pass unchanged (the
    engine reads only their shape)."""
    if t.numel() == 0:
        return t
    if t.device == device and t.dtype == dtype and t.is_contiguous() and t.data_ptr() % ALIGNMENT == 0:
        return t
    out = torch.empty(t.shape, dtype=dtype, device=device)  # the CUDA caching allocator aligns to 512 bytes
    out.copy_(t)
    return out


class TrtEngine:
    """A serialized TensorRT engine behind the name-keyed `run(feeds) -> outputs` contract.

    Outputs in `REUSED_OUTPUTS` live in buffers reused per shape class (`OutputPool`): such an output is
    valid until this engine runs again in the same thread with the same output shape. Every other output
    (the `present.*` KV caches, `logits`) is a fresh tensor the caller owns.
    """

    def __init__(self, path: str | Path, built_with: str | None = None, device: str = "cuda"):
        trt = require("tensorrt")

        path = Path(path)
        if built_with is not None and built_with != trt.__version__:
            raise ArtifactError(f"{path}: built by TensorRT {built_with}, this is TensorRT {trt.__version__}; "
                                "rebuild the artifact with btp-compile --backend tensorrt")
        device = require_device(device)
        if device.type == "cuda" and device.index is None:  # compare equal to the tensors' cuda:N
            device = torch.device("cuda", torch.cuda.current_device())
        logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ArtifactError(f"{path}: TensorRT cannot deserialize this engine")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode = engine.get_tensor_mode
        inputs = [n for n in names if mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if mode(n) == trt.TensorIOMode.OUTPUT]
        contexts = []
        for p in range(engine.num_optimization_profiles):
            ctx = engine.create_execution_context()
            ctx.set_optimization_profile_async(p, torch.cuda.current_stream(device).cuda_stream)
            contexts.append(ctx)
        ranges = [{n: tuple(tuple(d) for d in engine.get_tensor_profile_shape(n, p)) for n in inputs}
                  for p in range(len(contexts))]
        dtypes = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self.engine = engine
        self._setup(path, device, inputs, outputs, dtypes, ranges, contexts)

    def _setup(self, path: Path, device: torch.device, inputs: list[str], outputs: list[str],
               dtypes: dict[str, torch.dtype], ranges: list[dict[str, Range]], contexts: list) -> None:
        """Everything `run` uses; separate from the TensorRT calls of `__init__` so it can be tested without."""
        self.path = path
        self.device = device
        self.input_names = inputs
        self.output_names = outputs
        self.contexts = contexts
        self._ranges = ranges
        self._dtypes = dtypes
        self._reused = [n for n in outputs if reuses_buffer(n)]
        self._pool = OutputPool(max(POOL_ENTRIES, 2 * len(self._reused)))  # room for two shapes per output
        self._lock = threading.Lock()  # an execution context serves one call at a time
        self._dummy = torch.zeros(1, dtype=torch.uint8, device=device)  # address for empty tensors

    def _profile(self, feeds: dict[str, torch.Tensor]) -> int:
        p = fit_profile({n: tuple(feeds[n].shape) for n in self.input_names}, self._ranges)
        if p is None:
            shapes = {n: tuple(feeds[n].shape) for n in self.input_names}
            raise ValueError(f"{self.path.name}: input shapes {shapes} fit none of the engine's profiles")
        return p

    def _address(self, t: torch.Tensor) -> int:
        return t.data_ptr() if t.numel() else self._dummy.data_ptr()

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self._lock:
            ctx = self.contexts[self._profile(feeds)]
            inputs = {}
            for n in self.input_names:
                t = engine_input(feeds[n], self.device, self._dtypes[n])
                inputs[n] = t  # held until the call is enqueued; the allocator orders reuse on this stream
                ctx.set_input_shape(n, tuple(t.shape))
                ctx.set_tensor_address(n, self._address(t))
            fed = {t.untyped_storage().data_ptr() for t in inputs.values() if t.numel()}
            outputs = {}
            for n in self.output_names:
                shape, dtype = tuple(ctx.get_tensor_shape(n)), self._dtypes[n]
                out = self._pool.get(n, shape, dtype, self.device) if n in self._reused else None
                if out is None or (out.numel() and out.untyped_storage().data_ptr() in fed):
                    out = torch.empty(shape, dtype=dtype, device=self.device)  # fresh (or fed back in as input)
                ctx.set_tensor_address(n, self._address(out))
                outputs[n] = out
            if not ctx.execute_async_v3(self._stream()):
                raise RuntimeError(f"{self.path.name}: TensorRT execution failed")
            return outputs


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}
    return table[dtype]
