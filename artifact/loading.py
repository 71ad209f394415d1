"""Artifact directory -> `Pipeline`: manifest checks, one engine per graph, the saved processor."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from btp.backends.onnxruntime_backend import OrtEngine, SessionOptions
from btp.runtime.dependencies import require, require_device
from btp.runtime.errors import ArtifactError, InputError

from .manifest import MANIFEST, read_manifest
from .processor import load_processor

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
            shape = engine.shapes.get(t.name)
            if shape is not None and (len(shape) != len(t.shape)
                                      or any(g is not None and g != m for g, m in zip(shape, t.shape))):
                raise ArtifactError(f"{path}: {kind[:-1]} {t.name} has shape {shape}, the manifest says {t.shape}")


def _check_bounds(engine, manifest, path: Path) -> None:
    """The manifest promises no more than the graph was traced for (graphs of older artifacts do not say)."""
    b = manifest.build
    promised = {"max_batch": b.max_batch, "max_prompt": b.max_prompt,
                "max_positions": manifest.chain.max_positions}
    for key, want in promised.items():
        found = getattr(engine, "metadata", {}).get(f"btp.{key}")
        if found is not None and found != str(want):
            raise ArtifactError(f"{path}: the graph was built for {key} {found}, the manifest says {want}")


def _check_names(engine, info, path: Path) -> None:
    for kind, names, tensors in (("inputs", engine.input_names, info.inputs),
                                 ("outputs", engine.output_names, info.outputs)):
        want = [t.name for t in tensors]
        if sorted(names) != sorted(want):
            raise ArtifactError(f"{path}: engine {kind} {names} disagree with the manifest's {want}")


def _check_token_ids(manifest, processor, root: Path) -> None:
    """The chain's token ids are the processor's: its image token, its padding token, ids inside its vocabulary."""
    chain, tok = manifest.chain, processor.tokenizer
    where = f"{root / MANIFEST}: chain"
    vocab = len(tok)
    for what, ids in (("image_token_id", [chain.image_token_id]), ("pad_token_id", [chain.pad_token_id]),
                      ("eos_token_ids", chain.eos_token_ids)):
        if any(not 0 <= i < vocab for i in ids):
            raise ArtifactError(f"{where} {what} {ids} outside the processor's vocabulary of {vocab}")
    image_token = getattr(processor, "image_token", None)
    if image_token is not None and tok.convert_tokens_to_ids(image_token) != chain.image_token_id:
        raise ArtifactError(f"{where} image_token_id {chain.image_token_id} is not the processor's "
                            f"{image_token} ({tok.convert_tokens_to_ids(image_token)})")
    if tok.pad_token_id is not None and tok.pad_token_id != chain.pad_token_id:
        raise ArtifactError(f"{where} pad_token_id {chain.pad_token_id} is not the processor's "
                            f"({tok.pad_token_id})")


def _use_tensorrt(backend: str, manifest, root: Path) -> bool:
    """auto: TensorRT where the artifact has engines and TensorRT is importable; else ONNX Runtime."""
    if backend == "onnxruntime":
        return False
    from btp.backends.tensorrt_backend import tensorrt_version

    available = bool(manifest.engines) and tensorrt_version() is not None
    if backend == "tensorrt" and not available:
        if not manifest.engines:
            raise ArtifactError(f"tensorrt: {root} has no engines (it was built for onnxruntime)", option="backend")
        require("tensorrt")  # raises DependencyError naming the extra
    return available


def _identity(root: Path):
    """What changes when a build replaces the artifact at `root`: its directory's inode and its manifest."""
    try:
        st = root.stat()
        return st.st_dev, st.st_ino, (root / MANIFEST).read_bytes()
    except OSError:
        return None


ATTEMPTS = 3


def load_pipeline(cls, path, backend: str, device: str, threads: int, optimization: str, verify: bool):
    root = Path(path)
    if backend not in BACKENDS:
        raise ArtifactError(f"backend must be one of {', '.join(BACKENDS)} for this artifact, got {backend!r}")
    require_device(device)
    cores = os.cpu_count() or 1
    if not isinstance(threads, int) or not 0 <= threads <= cores:
        raise InputError(f"threads must be 0 (ONNX Runtime's choice) to {cores} (this machine's cores), got {threads}")
    # A build may replace the artifact while it loads (btp-compile --force switches directories atomically): a
    # load that saw the switch could hold graphs of both, so it is done again; an error is trusted only when the
    # artifact did not change under it.
    for _ in range(ATTEMPTS):
        before = _identity(root)
        try:
            pipe = _load(cls, root, backend, device, threads, optimization, verify)
        except ArtifactError:
            if before is not None and _identity(root) != before:
                continue
            raise
        if _identity(root) == before:
            return pipe
        log.info("%s was replaced while loading; loading it again", root)
    raise ArtifactError(f"{root}: replaced by a build {ATTEMPTS} times while loading; load it again when builds stop")


def _load(cls, root: Path, backend: str, device: str, threads: int, optimization: str, verify: bool):
    manifest = read_manifest(root, verify=verify)
    use_trt = _use_tensorrt(backend, manifest, root)
    options = SessionOptions(intra_op_threads=threads, optimization=optimization)
    engines = {}
    scratch = None
    for name, info in manifest.graphs.items():
        if use_trt:
            from btp.backends.tensorrt_backend import SharedScratch, TrtEngine

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
            _check_bounds(engine, manifest, file)
        engines[name] = engine
    try:
        processor = load_processor(root / manifest.processor)
    except (OSError, ValueError, ImportError) as err:
        raise ArtifactError(f"{root / manifest.processor}: cannot load the processor ({err})") from err
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise ArtifactError(f"{root / manifest.processor}: the processor has no tokenizer")
    _check_token_ids(manifest, processor, root)
    tokenizer.padding_side = "left"
    # The build's bounds, image-token range included (the chain document stores only batch and prompt).
    pipe = cls(engines, replace(manifest.chain.spec(), bounds=manifest.build.bounds), processor, device=device)
    pipe.manifest = manifest
    log.info("loaded %s: %d graphs on %s", root, len(engines), device)
    return pipe
