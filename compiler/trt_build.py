"""Build one TensorRT engine per exported graph (written against the TensorRT 10/11 Python API).

Strongly typed networks (precision comes from the exported graph; the FP16/BF16 builder flags are gone
in TensorRT 10.12+/11), `parse_from_file` so external weights resolve, parser errors reported with the
node, a workspace limit (`btp-compile --workspace`), TF32 off unless `--tf32` (TensorRT turns it on by default,
which rounds fp32 matmul inputs to 10-bit mantissas and can change which tokens a prune graph keeps), a
persistent timing cache in the artifact, and the optimization profiles of `trt_profiles`, derived from the graph
I/O specs. Every call that reports failure through its return value is checked.
"""

from __future__ import annotations

import logging
from pathlib import Path

from btp.runtime.dependencies import require
from btp.runtime.errors import BtpError

from .trt_profiles import profiles

log = logging.getLogger(__name__)


def configure(trt, builder, config, graph: str, shapes_per_profile: list[dict], workspace_gib: float,
              tf32: bool, cache_bytes: bytes):
    """Set up a builder `config` for one graph: workspace, TF32, the timing cache, one optimization profile per
    entry of `shapes_per_profile` (input -> (min, opt, max)). Returns the timing cache. `BtpError` naming the
    graph (and input) where TensorRT refuses a setting."""
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    cache = config.create_timing_cache(cache_bytes)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise BtpError(f"{graph}: TensorRT refused the timing cache (engines/timing.cache from another TensorRT "
                       "version or GPU?); delete it and build again")
    for p, shapes in enumerate(shapes_per_profile):
        profile = builder.create_optimization_profile()
        for tensor, (lo, opt, hi) in shapes.items():
            if profile.set_shape(tensor, lo, opt, hi) is False:
                raise BtpError(f"{graph}: TensorRT refused profile {p} of input {tensor}: min {lo}, opt {opt}, "
                               f"max {hi}")
        if config.add_optimization_profile(profile) < 0:
            raise BtpError(f"{graph}: TensorRT refused optimization profile {p} ({shapes})")
    return cache


def read_timing_cache(shared: Path | None) -> bytes:
    """The timing cache a build starts from: `--timing-cache PATH` where that file exists, else empty."""
    if shared is None or not Path(shared).is_file():
        return b""
    return Path(shared).read_bytes()


def write_timing_cache(blob: bytes, artifact_cache: Path, shared: Path | None) -> None:
    """The cache after a build: into the artifact, and back to `--timing-cache PATH` (whole or not at all)."""
    artifact_cache.write_bytes(blob)
    if shared is not None:
        shared = Path(shared)
        shared.parent.mkdir(parents=True, exist_ok=True)
        tmp = shared.with_name(f".{shared.name}.tmp")
        tmp.write_bytes(blob)
        tmp.replace(shared)


def build_engines(root: Path, graphs: dict, workspace_gib: float = 4.0, tf32: bool = False, on_graph=None,
                  timing_cache: Path | None = None) -> dict[str, str]:
    """Build `root/engines/{name}.engine` for every graph in `graphs` (name -> GraphInfo, with its phases);
    returns the files.
    `timing_cache` is a file shared across builds: read when it exists, rewritten after the build."""
    trt = require("tensorrt")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    engines_dir = root / "engines"
    engines_dir.mkdir(exist_ok=True)
    cache_path = engines_dir / "timing.cache"
    cache_bytes = read_timing_cache(timing_cache)
    files = {}
    for name, info in graphs.items():
        if on_graph:
            on_graph(name, "engine")
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(root / info.file)):
            err = parser.get_error(0)
            node = err.node_name() if hasattr(err, "node_name") else str(err.node())
            raise BtpError(f"{info.file}: the TensorRT parser refused node {node!r}: {err.desc()}")
        config = builder.create_builder_config()
        configure(trt, builder, config, name, profiles(info.inputs, info.phases), workspace_gib, tf32, cache_bytes)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise BtpError(f"{info.file}: TensorRT could not build an engine (see the TensorRT log above)")
        path = engines_dir / f"{name}.engine"
        path.write_bytes(bytes(blob))
        cache_bytes = bytes(config.get_timing_cache().serialize())
        files[name] = path.relative_to(root).as_posix()
    write_timing_cache(cache_bytes, cache_path, timing_cache)
    return files
