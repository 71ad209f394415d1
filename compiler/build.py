"""`compile_artifact`: model + plan -> artifact directory (ARCHITECTURE section 5), all or nothing.

Everything that can be checked before work starts is checked first (model, plan, limits, OUT); the build
then writes into a temporary sibling of OUT and renames it into place only when complete, so a failed or
interrupted build leaves nothing that `Pipeline.load` would accept.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from btp.artifact.manifest import (
    ARTIFACT_FORMAT,
    MANIFEST,
    BuildOptions,
    GraphInfo,
    Manifest,
    PhaseInfo,
    TensorInfo,
    file_table,
    read_manifest,
)
from btp.artifact.processor import save_processor
from btp.backends.tensorrt_backend import tensorrt_version
from btp.runtime.dependencies import require
from btp.runtime.errors import ArtifactError, BuildError

from .assemble import build_graphs, check_image_range
from .export import EXPORTER, Exported, Limits, export_graph
from .models import DTYPES, load_model
from .presets import resolve_plan
from .publish import build_lock, publish, remove_stale, temp_prefix
from .trt_lint import SUPPORTED_OPSETS, lint_model

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class BuildConfig:
    """What `btp-compile` asks for."""

    model: str
    plan: str
    out: Path
    backend: str = "auto"
    dtype: str = "float32"
    limits: Limits = field(default_factory=Limits)
    opset: int = 18
    force: bool = False
    workspace_gib: float = 4.0  # TensorRT builder workspace limit (used by --backend tensorrt only)
    tf32: bool = False  # let TensorRT compute fp32 matmuls/convolutions in TF32 (--backend tensorrt only)
    timing_cache: Path | None = None  # a TensorRT timing cache shared across builds (--backend tensorrt only)


@dataclass
class BuildResult:
    out: Path
    backend: str
    graphs: list[Exported]
    warnings: list[str]
    manifest: Manifest


def tensorrt_available() -> bool:
    return tensorrt_version() is not None


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise BuildError(f"must be one of {', '.join(BACKENDS)}, got {backend!r}", option="backend")
    if backend == "auto":
        return "tensorrt" if tensorrt_available() else "onnxruntime"
    if backend == "tensorrt":
        require("tensorrt")  # DependencyError: names the extra that installs it
    return backend


def _check_out(out: Path, force: bool, model: str = "") -> None:
    """OUT may be created, or replaced with `force` when it is a btp artifact or an empty directory: never the
    model's own directory, one inside it or one holding it, and never any other directory (`--force` deletes)."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise BuildError(f"{out} already exists; pass {{option}} to replace it", option="force")
    if out.is_symlink() or not out.is_dir():
        raise BuildError(f"{out} exists and is not a directory; {{option}} replaces only a btp artifact or an empty "
                         "directory", option="force")
    if model and not model.startswith("builtin:") and Path(model).expanduser().exists():
        src, dst = Path(model).expanduser().resolve(), out.resolve()
        if src == dst or src.is_relative_to(dst) or dst.is_relative_to(src):
            raise BuildError(f"{out}: {{option}} would replace the model's own files ({model}); choose another output",
                             option="force")
    if not any(out.iterdir()):
        return
    try:
        read_manifest(out, verify=False)
    except ArtifactError as err:
        raise BuildError(f"{out} is not a btp artifact ({str(err).split(': ', 1)[-1]}); {{option}} replaces only a btp "
                         "artifact or an empty directory, so nothing was deleted", option="force") from err


def _check_limits(cfg: BuildConfig, lim: Limits, image_tokens: int) -> None:
    """The bounds `lim` (image-token range resolved) fit the model's `image_tokens` (the most of one image)."""
    for option in ("max_batch", "max_new_tokens"):
        if getattr(lim, option) < 1:
            raise BuildError(f"must be >= 1, got {getattr(lim, option)}", option=option)
    if lim.max_prompt <= image_tokens:
        raise BuildError(f"{lim.max_prompt} cannot hold the model's {image_tokens} image tokens plus a question; "
                         f"expected more than {image_tokens}", option="max_prompt")
    if cfg.opset not in SUPPORTED_OPSETS:
        lo, hi = SUPPORTED_OPSETS.start, SUPPORTED_OPSETS.stop - 1
        raise BuildError(f"must be in {lo}..{hi} (what TensorRT 10/11 parse), got {cfg.opset}", option="opset")


def _check_image_options(lim: Limits) -> None:
    """What can be said of `--min-image-tokens`/`--max-image-tokens` before the model loads."""
    lo, hi = lim.min_image_tokens, lim.max_image_tokens
    for option, v in (("min_image_tokens", lo), ("max_image_tokens", hi)):
        if not isinstance(v, int) or v < 0:
            raise BuildError(f"must be a number of image tokens >= 1 (0: the processor's bound), got {v!r}",
                             option=option)
    if lo and hi and lo > hi:
        raise BuildError(f"must not exceed the maximum image tokens ({hi}), got {lo}", option="min_image_tokens")


def image_bounds(lim: Limits, model) -> Limits:
    """`lim` with its image-token range resolved against `model`'s processor: 0 takes the processor's own bound,
    a value outside the processor's range is refused, and so is any range for a family with a fixed count."""
    allowed = model.family.image_token_range(model)
    lo, hi = lim.min_image_tokens, lim.max_image_tokens
    if allowed is None:
        if lo or hi:
            raise BuildError(f"applies to models whose image-token count follows the image's size; {model.name} "
                             f"({model.family.name}) has a fixed {model.image_tokens} image tokens per image",
                             option="min_image_tokens" if lo else "max_image_tokens")
        return lim
    lo, hi = lo or allowed[0], hi or allowed[1]
    for option, v in (("min_image_tokens", lo), ("max_image_tokens", hi)):
        if not allowed[0] <= v <= allowed[1]:
            raise BuildError(f"must be within the {allowed[0]}..{allowed[1]} image tokens {model.name}'s processor "
                             f"makes, got {v}", option=option)
    if lo > hi:
        raise BuildError(f"must not exceed the maximum image tokens ({hi}), got {lo}", option="min_image_tokens")
    return replace(lim, min_image_tokens=lo, max_image_tokens=hi)


def _producer() -> dict[str, str]:
    try:
        v = version("btp")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        v = "0+unknown"
    import torch

    return {"name": "btp", "version": v, "torch": torch.__version__}


def compile_artifact(cfg: BuildConfig, on_graph: Callable[[str, str, Exported | None], None] | None = None
                     ) -> BuildResult:
    """Build the artifact of `cfg`. `on_graph(name, phase, exported)` reports progress: phase is "start"
    before a graph exports and "done" after. Raises a `BtpError` (one line) for anything the user can fix."""
    out = Path(cfg.out)
    backend = resolve_backend(cfg.backend)
    if cfg.dtype not in DTYPES:
        raise BuildError(f"must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}", option="dtype")
    if not (isinstance(cfg.workspace_gib, int | float) and math.isfinite(cfg.workspace_gib) and cfg.workspace_gib > 0):
        raise BuildError(f"must be a number of GiB > 0, got {cfg.workspace_gib!r}", option="workspace_gib")
    _check_image_options(cfg.limits)
    if cfg.tf32 and backend != "tensorrt":
        raise BuildError(f"sets how TensorRT builds fp32 engines; this build's backend is {backend}", option="tf32")
    if cfg.timing_cache is not None:
        if backend != "tensorrt":
            raise BuildError(f"is TensorRT's; this build's backend is {backend}", option="timing_cache")
        if Path(cfg.timing_cache).is_dir():
            raise BuildError(f"{cfg.timing_cache}: expected a file (made if missing), found a directory",
                             option="timing_cache")
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]  # removed again if the build fails
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BuildError(f"cannot write the artifact next to {out}: {err.strerror or err}") from err
    try:
        with build_lock(out):
            _check_out(out, cfg.force, cfg.model)
            for p in remove_stale(out):
                log.info("removed %s, left by a build that did not finish", p)
            return _build(cfg, out, backend, on_graph)
    except BaseException:
        for p in made:  # deepest first; only directories this build made and left empty
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def _build(cfg: BuildConfig, out: Path, backend: str, on_graph) -> BuildResult:
    model = load_model(cfg.model, dtype=cfg.dtype)
    plan = resolve_plan(cfg.plan, model)
    lim = image_bounds(cfg.limits, model)
    dynamic = lim.max_image_tokens > 0
    _check_limits(cfg, lim, lim.max_image_tokens if dynamic else model.image_tokens)
    if dynamic:
        check_image_range(plan, lim.min_image_tokens, lim.max_image_tokens)  # a plan of shares, at every size
    # The saved processor resizes every image into the artifact's image-token range.
    processor = model.family.bounded_processor(model, lim.min_image_tokens, lim.max_image_tokens) if dynamic \
        else model.processor
    graphs, chain = build_graphs(model, plan, lim.max_positions)
    chain = replace(chain, bounds=lim)

    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the artifact is an ordinary directory
    except OSError as err:
        raise BuildError(f"cannot write the artifact next to {out}: {err.strerror or err}") from err
    done = False
    try:
        (tmp / "onnx").mkdir()
        alive = {st.prune: graphs[st.prune].recipe.alive for st in chain.stages if st.prune}
        exported, warnings, infos = [], [], {}
        for name, module in graphs.items():
            if on_graph:
                on_graph(name, "start", None)
            e = export_graph(module, tmp / "onnx" / f"{name}.onnx", limits=lim, opset=cfg.opset,
                             image_token_id=chain.image_token_id, image_tokens=chain.image_tokens,
                             alive=alive.get(name, 0))
            problems = lint_model(e.path)
            if problems and backend == "tensorrt":
                raise BuildError(f"{name}.onnx is not TensorRT-compatible: {problems[0]}")
            warnings += [f"{name}.onnx: {p}" for p in problems]
            spec = module.spec()
            infos[name] = GraphInfo(
                file=f"onnx/{name}.onnx", exporter=EXPORTER, opset=e.opset, nodes=e.nodes, seconds=round(e.seconds, 3),
                inputs=[TensorInfo(**t.to_dict()) for t in spec.inputs],
                outputs=[TensorInfo(**t.to_dict()) for t in spec.outputs],
                phases=[PhaseInfo(name=p.name, dims={d: list(r) for d, r in p.dims.items()})
                        for p in spec.ranges(lim)],
            )
            exported.append(e)
            if on_graph:
                on_graph(name, "done", e)
        engines, trt_version = {}, None
        if backend == "tensorrt":
            import tensorrt

            from .trt_build import build_engines

            engines = build_engines(tmp, infos, workspace_gib=cfg.workspace_gib, tf32=cfg.tf32,
                                    timing_cache=cfg.timing_cache,
                                    on_graph=on_graph and (lambda n, _p: on_graph(n, "engine", None)))
            trt_version = tensorrt.__version__
        save_processor(processor, tmp / "processor")
        manifest = Manifest(
            format=ARTIFACT_FORMAT,
            producer=_producer(),
            model=model.summary(),
            plan=plan.model_dump(mode="json", by_alias=True, exclude_none=True),
            chain=chain.to_dict(),
            build=BuildOptions(backend=backend, dtype=cfg.dtype, opset=cfg.opset, max_batch=lim.max_batch,
                               max_prompt=lim.max_prompt, max_new_tokens=lim.max_new_tokens,
                               workspace_gib=cfg.workspace_gib if backend == "tensorrt" else None,
                               tf32=cfg.tf32 if backend == "tensorrt" else None,
                               min_image_tokens=lim.min_image_tokens, max_image_tokens=lim.max_image_tokens),
            graphs=infos,
            files=file_table(tmp),
            engines=engines,
            tensorrt=trt_version,
        )
        (tmp / MANIFEST).write_text(manifest.to_json())
        publish(tmp, out)
        done = True
        for e in exported:
            e.path = out / "onnx" / e.path.name
    except OSError as err:
        raise BuildError(f"writing the artifact failed: {err.strerror or err} ({err.filename or out})") from err
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)
    return BuildResult(out, backend, exported, warnings, manifest)

