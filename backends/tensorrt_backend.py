"""TensorRT backend: one deserialized engine per graph, one execution context per optimization profile.

Written against the TensorRT 10/11 Python API (`set_input_shape`, `set_tensor_address`,
`execute_async_v3`); tensors are torch CUDA tensors, so the chain's KV caches stay on the device. The engines of
one chain share a `SharedScratch`: one block of activation memory (contexts are created with user-managed
memory; the chain runs one engine at a time, so the block is the largest need of any engine and profile, not
their sum) and one dedicated CUDA stream, ordered with torch's current stream before and after each call. Every
TensorRT call that reports failure through its return value is checked. `TrtEngine` needs the `tensorrt`
package and a GPU; the rules it follows (which profile a call uses, which inputs are copied, which output
buffers are reused, how the scratch block is sized and bound) are plain code here, tested without either.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from btp.runtime import names as n
from btp.runtime.dependencies import require, require_device
from btp.runtime.errors import ArtifactError

ALIGNMENT = 256  # bytes: TensorRT's setTensorAddress asks for pointers with at least 256-byte alignment

# Outputs the chain consumes before it calls the same engine again (in the same thread): their device
# buffers are reused across calls. `present.*` (the KV caches the chain keeps as the next step's past),
# `logits` (kept across steps by `generate(output_logits=True)` and returned by `Pipeline.prefill`) and any
# output not named here get a fresh buffer on every call.
REUSED_OUTPUTS = frozenset({
    n.IMAGE_FEATURES, n.INPUTS_EMBEDS, n.HIDDEN_STATES, n.SCORES,
    n.PRUNED_HIDDEN_STATES, n.PRUNED_POSITION_IDS, n.PRUNED_ATTENTION_MASK, n.KEEP_INDICES,
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


def _checked(ok, message: str) -> None:
    """TensorRT reports a refused setting by returning False: make it the project's error."""
    if ok is False:
        raise ArtifactError(message)


def device_scope(device: torch.device):
    """`torch.cuda.device(device)` for CUDA devices (so cuda:1 works), nothing for the CPU of the tests."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def memory_size(engine, profile: int) -> int:
    """Activation memory an engine's context needs in `profile`, in bytes, across TensorRT 10.x/11 spellings."""
    for name in ("get_device_memory_size_for_profile_v2", "get_device_memory_size_for_profile"):
        if hasattr(engine, name):
            return int(getattr(engine, name)(profile))
    return int(getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size)


class SharedScratch:
    """The activation memory and the CUDA stream that every execution context of one chain shares.

    The block grows to the largest size attached (every context is re-pointed when it does) and is bound with
    `set_device_memory(ptr, size)` (TensorRT 10.1+; the `device_memory` attribute before). All engines enqueue on
    `stream`, so calls from several threads run one after another on the GPU and never overlap in the block.
    """

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.block: torch.Tensor | None = None
        self._contexts: list[tuple[object, str]] = []

    @property
    def size(self) -> int:
        return 0 if self.block is None else self.block.numel()

    @property
    def handle(self) -> int:
        """The stream's handle for `execute_async_v3` (0 on the CPU of the tests)."""
        return self.stream.cuda_stream if self.stream is not None else 0

    def attach(self, ctx, size: int, what: str) -> None:
        """Give context `ctx` (described by `what` in errors) at least `size` bytes of the shared block."""
        self._contexts.append((ctx, what))
        if size > self.size:
            self.block = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
            for c, w in self._contexts:
                self._bind(c, w)
        else:
            self._bind(ctx, what)

    def _bind(self, ctx, what: str) -> None:
        ptr, size = self.block.data_ptr(), self.block.numel()
        if hasattr(ctx, "set_device_memory"):
            _checked(ctx.set_device_memory(ptr, size), f"{what}: TensorRT refused {size} bytes of device memory")
        else:  # TensorRT 10.0
            ctx.device_memory = ptr

    def before(self) -> None:
        """The stream waits for what torch queued on its current stream (the inputs)."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def after(self) -> None:
        """torch's current stream waits for the engine (the outputs)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)


class TrtEngine:
    """A serialized TensorRT engine behind the name-keyed `run(feeds) -> outputs` contract.

    Outputs in `REUSED_OUTPUTS` live in buffers reused per shape class (`OutputPool`): such an output is
    valid until this engine runs again in the same thread with the same output shape. Every other output
    (the `present.*` KV caches, `logits`) is a fresh tensor the caller owns.
    """

    def __init__(self, path: str | Path, built_with: str | None = None, device: str = "cuda",
                 scratch: SharedScratch | None = None):
        trt = require("tensorrt")

        path = Path(path)
        if built_with is not None and built_with != trt.__version__:
            raise ArtifactError(f"{path}: built by TensorRT {built_with}, this is TensorRT {trt.__version__}; "
                                "rebuild the artifact with this TensorRT")
        device = require_device(device)
        if device.type == "cuda" and device.index is None:  # compare equal to the tensors' cuda:N
            device = torch.device("cuda", torch.cuda.current_device())
        scratch = scratch if scratch is not None else SharedScratch(device)
        with device_scope(device):
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
                ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                if ctx is None:
                    raise ArtifactError(f"{path}: TensorRT could not create an execution context (profile {p})")
                scratch.attach(ctx, memory_size(engine, p), f"{path.name} profile {p}")
                _checked(ctx.set_optimization_profile_async(p, scratch.handle),
                         f"{path.name}: TensorRT refused to select optimization profile {p}")
                contexts.append(ctx)
            if scratch.stream is not None:
                scratch.stream.synchronize()  # the profile switches are done before any input is bound
        ranges = [{n: tuple(tuple(d) for d in engine.get_tensor_profile_shape(n, p)) for n in inputs}
                  for p in range(len(contexts))]
        dtypes = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self.engine = engine
        self._setup(path, device, inputs, outputs, dtypes, ranges, contexts, scratch)

    def _setup(self, path: Path, device: torch.device, inputs: list[str], outputs: list[str],
               dtypes: dict[str, torch.dtype], ranges: list[dict[str, Range]], contexts: list,
               scratch: SharedScratch | None = None) -> None:
        """Everything `run` uses; separate from the TensorRT calls of `__init__` so it can be tested without."""
        self.scratch = scratch if scratch is not None else SharedScratch(device)
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

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self._lock, device_scope(self.device):
            ctx = self.contexts[self._profile(feeds)]
            inputs = {}
            name = self.path.name
            for n in self.input_names:
                t = engine_input(feeds[n], self.device, self._dtypes[n])
                inputs[n] = t  # held until the call is enqueued; torch's stream waits for the engine after it
                _checked(ctx.set_input_shape(n, tuple(t.shape)),
                         f"{name}: TensorRT refused shape {tuple(t.shape)} for input {n}")
                _checked(ctx.set_tensor_address(n, self._address(t)), f"{name}: TensorRT refused the address of {n}")
            fed = {t.untyped_storage().data_ptr() for t in inputs.values() if t.numel()}
            outputs = {}
            for n in self.output_names:
                shape, dtype = tuple(ctx.get_tensor_shape(n)), self._dtypes[n]
                out = self._pool.get(n, shape, dtype, self.device) if n in self._reused else None
                if out is None or (out.numel() and out.untyped_storage().data_ptr() in fed):
                    out = torch.empty(shape, dtype=dtype, device=self.device)  # fresh (or fed back in as input)
                _checked(ctx.set_tensor_address(n, self._address(out)), f"{name}: TensorRT refused the address of {n}")
                outputs[n] = out
            self.scratch.before()
            ok = ctx.execute_async_v3(self.scratch.handle)
            self.scratch.after()
            if not ok:
                raise RuntimeError(f"{name}: TensorRT execution failed")
            return outputs


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}
    return table[dtype]
