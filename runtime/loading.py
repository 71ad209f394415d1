"""Artifact directory -> `Pipeline`: manifest checks, one engine per graph, the saved processor."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .chain import ChainSpec
from .dependencies import require, require_device
from .errors import ArtifactError, InputError
from .manifest import read_manifest
from .onnxruntime_backend import OrtEngine, SessionOptions

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt")


def _check_io(engine, info, path: Path) -> None:
    """The graph file must declare exactly the manifest's inputs and outputs, with the same dtypes."""
    for kind, names, types, tensors in (
        ("inputs", engine.input_names, engine.input_types, info.inputs),
        ("outputs", engine.output_names, engine.output_types, info.outputs),
    ):
        want = [t.name for t in tensors]
        if names != want:
            raise ArtifactError(f"{path}: graph {kind} {names} disagree with the manifest's {want}")
        for t in tensors:
            found = types.get(t.name)
            if found is not None and str(found).removeprefix("torch.") != t.dtype:
                raise ArtifactError(f"{path}: {kind[:-1]} {t.name} is {found}, the manifest says {t.dtype}")


def _check_names(engine, info, path: Path) -> None:
    for kind, names, tensors in (("inputs", engine.input_names, info.inputs),
                                 ("outputs", engine.output_names, info.outputs)):
        want = [t.name for t in tensors]
        if sorted(names) != sorted(want):
            raise ArtifactError(f"{path}: engine {kind} {names} disagree with the manifest's {want}")


def _use_tensorrt(backend: str, manifest, root: Path) -> bool:
    """auto: TensorRT where the artifact has engines and TensorRT is importable; else ONNX Runtime."""
    if backend == "onnxruntime":
        return False
    from .tensorrt_backend import tensorrt_version

    available = bool(manifest.engines) and tensorrt_version() is not None
    if backend == "tensorrt" and not available:
        if not manifest.engines:
            raise ArtifactError(f"{root}: cannot run with backend tensorrt: it has no engines "
                                "(built with --backend onnxruntime)")
        require("tensorrt")  # raises DependencyError naming the extra
    return available


def load_pipeline(cls, path, backend: str, device: str, threads: int, optimization: str, verify: bool):
    root = Path(path)
    if backend not in BACKENDS:
        raise ArtifactError(f"backend must be one of {', '.join(BACKENDS)} for this artifact, got {backend!r}")
    require_device(device)
    cores = os.cpu_count() or 1
    if not isinstance(threads, int) or not 0 <= threads <= cores:
        raise InputError(f"threads must be 0 (ONNX Runtime's choice) to {cores} (this machine's cores), got {threads}")
    manifest = read_manifest(root, verify=verify)
    use_trt = _use_tensorrt(backend, manifest, root)
    options = SessionOptions(intra_op_threads=threads, optimization=optimization)
    engines = {}
    scratch = None
    for name, info in manifest.graphs.items():
        if use_trt:
            from .tensorrt_backend import SharedScratch, TrtEngine

            file = root / manifest.engines[name]
            device = device if device.startswith("cuda") else "cuda"
            scratch = scratch or SharedScratch(require_device(device))  # one block and stream for the chain
            engine = TrtEngine(file, manifest.tensorrt, device, scratch)
        else:
            file = root / info.file
            engine = OrtEngine(file, options, device)
        if use_trt:
            _check_names(engine, info, file)
        else:
            _check_io(engine, info, file)
        engines[name] = engine
    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(root / manifest.processor))
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{root / manifest.processor}: cannot load the processor ({err})") from err
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"
    pipe = cls(engines, ChainSpec.from_dict(manifest.chain), processor, device=device)
    pipe.manifest = manifest
    log.info("loaded %s: %d graphs on %s", root, len(engines), device)
    return pipe
