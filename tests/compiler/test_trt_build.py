"""The TensorRT builder configuration without TensorRT: a fake builder and config record the calls the TensorRT
10/11 Python API documents, and answer failures the way it reports them (None, False, -1)."""

from types import SimpleNamespace

import pytest

from btp.compiler.trt_build import configure
from btp.runtime.errors import BtpError

FAKE_TRT = SimpleNamespace(
    MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
    BuilderFlag=SimpleNamespace(TF32="TF32"),
)
SHAPES = [{"x": ((1, 1), (1, 4), (2, 8))}, {"x": ((1, 1), (1, 1), (2, 1))}]


class FakeProfile:
    def __init__(self, refuse: bool):
        self.shapes, self.refuse = {}, refuse

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (lo, opt, hi)
        return False if self.refuse else None  # the binding returns None; a bool False is a refusal


class FakeBuilder:
    def __init__(self, refuse_shape: bool = False):
        self.refuse_shape = refuse_shape

    def create_optimization_profile(self):
        return FakeProfile(self.refuse_shape)


class FakeConfig:
    def __init__(self, cache_ok: bool = True, profile_index: int | None = None):
        self.flags, self.calls, self.profiles = set(["TF32"]), [], []  # TF32 is on by default in TensorRT
        self.cache_ok, self.profile_index = cache_ok, profile_index

    def set_memory_pool_limit(self, pool, size):
        self.calls.append(("pool", pool, size))

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def create_timing_cache(self, blob):
        return ("cache", blob)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.calls.append(("cache", cache, ignore_mismatch))
        return self.cache_ok

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1 if self.profile_index is None else self.profile_index


def test_fp32_engines_are_built_without_tf32_unless_asked():
    config = FakeConfig()
    configure(FAKE_TRT, FakeBuilder(), config, "stage0", SHAPES, 4.0, tf32=False, cache_bytes=b"")
    assert "TF32" not in config.flags
    assert ("pool", "WORKSPACE", 4 * 2**30) in config.calls and ("cache", ("cache", b""), False) in config.calls
    assert [p.shapes for p in config.profiles] == SHAPES
    config = FakeConfig()
    configure(FAKE_TRT, FakeBuilder(), config, "stage0", SHAPES, 0.5, tf32=True, cache_bytes=b"x")
    assert "TF32" in config.flags and ("pool", "WORKSPACE", 2**29) in config.calls


@pytest.mark.parametrize(
    ("builder", "config", "message"),
    [
        (FakeBuilder(), FakeConfig(cache_ok=False), "stage0: TensorRT refused the timing cache"),
        (FakeBuilder(), FakeConfig(profile_index=-1), "stage0: TensorRT refused optimization profile 0"),
        (FakeBuilder(refuse_shape=True), FakeConfig(), "stage0: TensorRT refused profile 0 of input x"),
    ],
)
def test_refusals_reported_by_return_value_name_the_graph(builder, config, message):
    with pytest.raises(BtpError, match=message):
        configure(FAKE_TRT, builder, config, "stage0", SHAPES, 4.0, tf32=False, cache_bytes=b"")


def test_tf32_is_recorded_in_the_manifest_of_tensorrt_builds_only(artifact):
    from btp.artifact.manifest import read_manifest

    build = read_manifest(artifact("btp")).build
    assert build.backend == "onnxruntime" and build.tf32 is None


def test_a_shared_timing_cache_is_read_and_rewritten_whole(tmp_path):
    from btp.compiler.trt_build import read_timing_cache, write_timing_cache

    shared = tmp_path / "caches" / "timing.cache"
    assert read_timing_cache(None) == b"" and read_timing_cache(shared) == b""  # first build: nothing to reuse
    artifact_cache = tmp_path / "timing.cache"
    write_timing_cache(b"after build one", artifact_cache, shared)
    assert artifact_cache.read_bytes() == shared.read_bytes() == b"after build one"
    assert read_timing_cache(shared) == b"after build one"  # the next build starts from it
    assert [p.name for p in shared.parent.iterdir()] == ["timing.cache"]  # no temporary file left
    write_timing_cache(b"artifact only", artifact_cache, None)
    assert shared.read_bytes() == b"after build one"


@pytest.mark.parametrize(("extra", "message"), [
    (["--timing-cache", "{tmp}/t.cache"], "--timing-cache is TensorRT's; this build's backend is onnxruntime"),
    (["--tf32"], "--tf32 sets how TensorRT builds fp32 engines"),
])
def test_tensorrt_options_without_tensorrt_are_one_line_errors(tmp_path, capsys, extra, message):
    from btp.cli.compile import main

    out = tmp_path / "x"
    args = [a.format(tmp=tmp_path) for a in extra]
    assert main(["builtin:tiny-llava", "--plan", "btp", "-o", str(out), "--backend", "onnxruntime", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()
