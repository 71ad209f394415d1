"""Build one TensorRT engine per exported graph (written against the TensorRT 10/11 Python API).

Strongly typed networks (precision comes from the exported graph; the FP16/BF16 builder flags are gone
in TensorRT 10.12+/11), `parse_from_file` so external weights resolve, parser errors reported with the
node, a workspace limit (`btp-compile --workspace`), a persistent timing cache in the artifact, and the
optimization profiles of `trt_profiles`, derived from the graph I/O specs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from btp.runtime.errors import BtpError

from .trt_profiles import Bounds, profiles

log = logging.getLogger(__name__)


def build_engines(root: Path, graphs: dict, chain: dict, bounds: Bounds, workspace_gib: float = 4.0,
                  on_graph=None) -> dict[str, str]:
    """Build `root/engines/{name}.engine` for every graph in `graphs` (name -> GraphInfo); returns the files."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    engines_dir = root / "engines"
    engines_dir.mkdir(exist_ok=True)
    cache_path = engines_dir / "timing.cache"
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
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
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)
        for shapes in profiles(name, info.inputs, chain, bounds):
            profile = builder.create_optimization_profile()
            for tensor, (lo, opt, hi) in shapes.items():
                profile.set_shape(tensor, lo, opt, hi)
            config.add_optimization_profile(profile)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise BtpError(f"{info.file}: TensorRT could not build an engine (see the TensorRT log above)")
        path = engines_dir / f"{name}.engine"
        path.write_bytes(bytes(blob))
        cache_bytes = bytes(config.get_timing_cache().serialize())
        files[name] = path.relative_to(root).as_posix()
    cache_path.write_bytes(cache_bytes)
    return files
