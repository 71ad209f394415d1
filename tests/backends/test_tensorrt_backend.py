"""TrtEngine's rules without TensorRT: profile choice, input copies, output buffer reuse (a fake context on CPU)."""

import contextlib
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from btp.backends import tensorrt_backend
from btp.backends.tensorrt_backend import (
    ALIGNMENT,
    REUSED_OUTPUTS,
    OutputPool,
    SharedScratch,
    TrtEngine,
    buffer_key,
    engine_input,
    fit_profile,
    memory_size,
    reuses_buffer,
)
from btp.runtime import ArtifactError

CPU = torch.device("cpu")
# A stage-like engine: prefill (past 0, seq 1..8) and decode (seq 1, past 1..12), batch 1..2.
RANGES = [
    {"inputs_embeds": ((1, 1, 4), (1, 4, 4), (2, 8, 4)), "past_key_values.0.key": ((1, 2, 0, 3), (1, 2, 0, 3),
                                                                                   (2, 2, 0, 3))},
    {"inputs_embeds": ((1, 1, 4), (1, 1, 4), (2, 1, 4)), "past_key_values.0.key": ((1, 2, 1, 3), (1, 2, 6, 3),
                                                                                   (2, 2, 12, 3))},
]


def test_fit_profile_picks_the_first_profile_holding_every_shape():
    prefill = {"inputs_embeds": (1, 5, 4), "past_key_values.0.key": (1, 2, 0, 3)}
    decode = {"inputs_embeds": (2, 1, 4), "past_key_values.0.key": (2, 2, 7, 3)}
    one_token_prefill = {"inputs_embeds": (1, 1, 4), "past_key_values.0.key": (1, 2, 0, 3)}
    assert fit_profile(prefill, RANGES) == 0 and fit_profile(decode, RANGES) == 1
    assert fit_profile(one_token_prefill, RANGES) == 0  # empty past: prefill even for one token
    assert fit_profile({**decode, "past_key_values.0.key": (2, 2, 13, 3)}, RANGES) is None  # past too long
    assert fit_profile({**prefill, "inputs_embeds": (3, 5, 4)}, RANGES) is None  # batch too large
    assert fit_profile({"inputs_embeds": (1, 5, 4)}, RANGES) is None  # an input missing
    assert fit_profile({**prefill, "inputs_embeds": (1, 5)}, RANGES) is None  # wrong rank


def test_reuse_rule_keeps_kv_caches_and_logits_fresh():
    assert all(reuses_buffer(n) for n in ("hidden_states", "scores", "keep_indices", "inputs_embeds"))
    assert not any(reuses_buffer(n) for n in ("present.0.key", "present.3.value", "logits", "something_new"))
    assert not any(n.startswith("present.") for n in REUSED_OUTPUTS)
    assert buffer_key("hidden_states", torch.Size([2, 1, 4])) == ("hidden_states", (2, 1, 4))


def test_output_pool_reuses_per_shape_and_evicts_the_least_recent():
    pool = OutputPool(entries=2)
    a = pool.get("hidden_states", (1, 3), torch.float32, CPU)
    assert pool.get("hidden_states", (1, 3), torch.float32, CPU) is a
    b = pool.get("hidden_states", (1, 4), torch.float32, CPU)
    assert b is not a and pool.get("hidden_states", (1, 3), torch.float32, CPU) is a  # a is now the most recent
    pool.get("scores", (1, 3), torch.float32, CPU)  # evicts (1, 4)
    assert len(pool) == 2 and pool.get("hidden_states", (1, 4), torch.float32, CPU) is not b
    assert pool.get("scores", (1, 3), torch.float16, CPU).dtype == torch.float16  # another dtype: a new buffer


def test_output_pool_is_per_thread():
    pool = OutputPool()
    mine = pool.get("hidden_states", (2, 2), torch.float32, CPU)
    theirs = []
    t = threading.Thread(target=lambda: theirs.append(pool.get("hidden_states", (2, 2), torch.float32, CPU)))
    t.start()
    t.join()
    assert theirs[0] is not mine and pool.get("hidden_states", (2, 2), torch.float32, CPU) is mine


def _aligned(shape, dtype=torch.float32):
    """A contiguous tensor whose address is ALIGNMENT-aligned (CPU tensors are only guaranteed 64 bytes)."""
    n = torch.Size(shape).numel()
    item = torch.empty(0, dtype=dtype).element_size()
    base = torch.zeros(n + ALIGNMENT // item, dtype=dtype)
    skip = (-base.data_ptr() % ALIGNMENT) // item
    return base[skip: skip + n].view(shape)


def test_engine_input_copies_only_when_needed():
    t = _aligned((2, 3))
    assert engine_input(t, CPU, torch.float32) is t
    assert engine_input(t, CPU, torch.float16).dtype == torch.float16  # wrong dtype: one cast
    wide = _aligned((2, 6))
    sliced = engine_input(wide[:, :3], CPU, torch.float32)  # non-contiguous view: one copy
    assert sliced.is_contiguous() and torch.equal(sliced, wide[:, :3])
    flat = _aligned((8,))
    shifted = engine_input(flat[1:5], CPU, torch.float32)  # contiguous, 4 bytes off alignment: one copy
    assert shifted.data_ptr() != flat[1:5].data_ptr() and torch.equal(shifted, flat[1:5])
    empty = torch.zeros((1, 2, 0, 3), dtype=torch.float64)
    assert engine_input(empty, CPU, torch.float32) is empty  # only its shape is read


class FakeContext:
    """An execution context on CPU: records shapes and addresses; output shapes follow the input shapes."""

    def __init__(self):
        self.shapes, self.addresses, self.runs = {}, {}, 0

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def get_tensor_shape(self, name):
        b, s, d = self.shapes["inputs_embeds"]
        past = self.shapes["past_key_values.0.key"]
        return {"hidden_states": (b, s, d), "present.0.key": (b, 2, past[2] + s, 3), "logits": (b, 5)}[name]

    def execute_async_v3(self, stream):
        assert stream == 0  # CPU: no CUDA stream
        self.runs += 1
        return True


@pytest.fixture
def engine():
    e = TrtEngine.__new__(TrtEngine)  # everything but the TensorRT calls of __init__
    names = ["hidden_states", "present.0.key", "logits"]
    dtypes = {"inputs_embeds": torch.float32, "past_key_values.0.key": torch.float32,
              **dict.fromkeys(names, torch.float32)}
    e._setup(Path("stage0.engine"), CPU, list(RANGES[0]), names, dtypes, RANGES,
             [FakeContext(), FakeContext()])
    return e


def _feeds(batch, seq, past):
    return {"inputs_embeds": _aligned((batch, seq, 4)), "past_key_values.0.key": _aligned((batch, 2, past, 3))}


def test_run_reuses_consumed_outputs_and_allocates_kv_caches_fresh(engine):
    prefill, decode = engine.contexts
    out = engine.run(_feeds(1, 5, 0))
    assert prefill.runs == 1 and decode.runs == 0
    first = engine.run(_feeds(1, 1, 5))
    second = engine.run(_feeds(1, 1, 6))  # the past grew: the inputs' shapes differ, hidden_states' does not
    assert decode.runs == 2
    assert second["hidden_states"] is first["hidden_states"]
    assert second["present.0.key"].data_ptr() != first["present.0.key"].data_ptr()  # kept as the next past
    assert second["logits"] is not first["logits"]
    assert second["present.0.key"].shape == (1, 2, 7, 3) and out["hidden_states"].shape == (1, 5, 4)
    assert decode.addresses["hidden_states"] == second["hidden_states"].data_ptr()


def test_run_passes_ready_inputs_without_copies(engine):
    feeds = _feeds(2, 1, 3)
    engine.run(feeds)
    ctx = engine.contexts[1]
    assert ctx.addresses["inputs_embeds"] == feeds["inputs_embeds"].data_ptr()
    assert ctx.addresses["past_key_values.0.key"] == feeds["past_key_values.0.key"].data_ptr()
    half = {**feeds, "inputs_embeds": feeds["inputs_embeds"].half()}
    engine.run(half)  # the engine's dtype is float32: cast once
    assert ctx.addresses["inputs_embeds"] != half["inputs_embeds"].data_ptr()


def test_run_never_writes_an_output_into_one_of_its_inputs(engine, monkeypatch):
    monkeypatch.setattr(tensorrt_backend, "ALIGNMENT", 1)  # so the pooled CPU buffer is fed as is, not copied
    out = engine.run(_feeds(1, 1, 2))
    again = engine.run({"inputs_embeds": out["hidden_states"], "past_key_values.0.key": _aligned((1, 2, 3, 3))})
    assert engine.contexts[1].addresses["inputs_embeds"] == out["hidden_states"].data_ptr()
    assert again["hidden_states"].data_ptr() != out["hidden_states"].data_ptr()


def test_run_refuses_shapes_outside_every_profile(engine):
    with pytest.raises(ValueError, match="fit none of the engine's profiles"):
        engine.run(_feeds(3, 1, 2))


class MemoryContext:
    """Records `set_device_memory(ptr, size)` as TensorRT 10.1+ takes it; `refuse` answers False."""

    def __init__(self, refuse: bool = False):
        self.bound, self.refuse = [], refuse

    def set_device_memory(self, ptr, size):
        self.bound.append((ptr, size))
        return False if self.refuse else None


def test_scratch_is_one_block_of_the_largest_need_bound_to_every_context():
    scratch = SharedScratch(CPU)
    a, b, c = MemoryContext(), MemoryContext(), MemoryContext()
    scratch.attach(a, 1000, "vision profile 0")
    scratch.attach(b, 4000, "stage0 profile 0")  # grows: a is re-pointed at the new block
    scratch.attach(c, 2500, "stage0 profile 1")  # fits: bound as is
    ptr = scratch.block.data_ptr()
    assert scratch.size == 4000 and scratch.handle == 0
    assert a.bound[-1] == b.bound[-1] == c.bound[-1] == (ptr, 4000)
    assert len(a.bound) == 2 and len(c.bound) == 1


def test_scratch_binds_the_tensorrt_10_0_attribute_and_reports_refusals():
    scratch = SharedScratch(CPU)
    old = SimpleNamespace()  # TensorRT 10.0: a writable device_memory attribute, no setter method
    scratch.attach(old, 64, "head profile 0")
    assert old.device_memory == scratch.block.data_ptr()
    with pytest.raises(ArtifactError, match="stage1.engine profile 0: TensorRT refused 64 bytes of device memory"):
        scratch.attach(MemoryContext(refuse=True), 16, "stage1.engine profile 0")


def test_memory_size_reads_each_tensorrt_spelling():
    assert memory_size(SimpleNamespace(get_device_memory_size_for_profile_v2=lambda p: 10 * (p + 1)), 1) == 20
    assert memory_size(SimpleNamespace(get_device_memory_size_for_profile=lambda p: 7), 0) == 7
    assert memory_size(SimpleNamespace(device_memory_size_v2=5, device_memory_size=3), 0) == 5
    assert memory_size(SimpleNamespace(device_memory_size=3), 0) == 3


class RefusingContext(FakeContext):
    def __init__(self, refuse: str):
        super().__init__()
        self.refuse = refuse

    def set_input_shape(self, name, shape):
        super().set_input_shape(name, shape)
        return not (self.refuse == "shape" and name == "past_key_values.0.key")

    def set_tensor_address(self, name, address):
        super().set_tensor_address(name, address)
        return not (self.refuse == "address" and name == "logits")


@pytest.mark.parametrize(("refuse", "message"), [
    ("shape", r"stage0.engine: TensorRT refused shape \(1, 2, 3, 3\) for input past_key_values.0.key"),
    ("address", "stage0.engine: TensorRT refused the address of logits"),
])
def test_run_checks_every_return_value(refuse, message):
    e = TrtEngine.__new__(TrtEngine)
    names = ["hidden_states", "present.0.key", "logits"]
    dtypes = {"inputs_embeds": torch.float32, "past_key_values.0.key": torch.float32,
              **dict.fromkeys(names, torch.float32)}
    e._setup(Path("stage0.engine"), CPU, list(RANGES[0]), names, dtypes, RANGES,
             [RefusingContext(refuse), RefusingContext(refuse)])
    with pytest.raises(ArtifactError, match=message):
        e.run(_feeds(1, 1, 3))


def test_runs_enter_the_engine_device(engine, monkeypatch):
    entered = []

    def scope(device):
        entered.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(tensorrt_backend, "device_scope", scope)
    engine.run(_feeds(1, 5, 0))
    assert entered == [CPU]


def test_device_scope_is_torch_cuda_device_for_cuda():
    from btp.backends.tensorrt_backend import device_scope as real_scope

    ctx = real_scope(torch.device("cuda", 1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert isinstance(real_scope(CPU), contextlib.nullcontext)
