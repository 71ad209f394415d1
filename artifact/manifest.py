"""The artifact manifest (ARCHITECTURE section 5): a frozen, validated document beside the graphs.

`compiler` writes it; `Pipeline.load` reads it and checks every file against it before running anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import fields
from pathlib import Path, PurePosixPath
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from btp.runtime.chain import Bounds, ChainSpec
from btp.runtime.errors import ArtifactError
from btp.runtime.pipeline import FAMILY_INPUTS

ARTIFACT_FORMAT = "btp-artifact/1"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20  # a manifest of 1000 graphs is well under 1 MiB


class TensorInfo(BaseModel):
    """One graph input or output: name, dtype name (torch spelling) and shape (symbolic dims as strings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    dtype: str = Field(pattern=r"^(float(16|32|64)|bfloat16|u?int(8|16|32|64)|bool)$")
    shape: list[Annotated[int, Field(ge=0)] | Annotated[str, Field(min_length=1)]]


class PhaseInfo(BaseModel):
    """One phase a graph runs in (prefill, decode): the (min, opt, max) of each symbolic input dim."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^(prefill|decode)$")
    dims: dict[str, Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=3, max_length=3)]]

    @field_validator("dims")
    @classmethod
    def _ordered(cls, v: dict) -> dict:
        for d, (lo, opt, hi) in v.items():
            if not lo <= opt <= hi:
                raise ValueError(f"dim {d!r}: expected min <= opt <= max, found {[lo, opt, hi]}")
        return v


class GraphInfo(BaseModel):
    """One exported graph and how it was made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    exporter: str
    opset: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    nodes: int
    seconds: float = 0.0
    # The graph spec's phases under the build's bounds (artifacts from before them have none): TensorRT
    # profiles and btp-check's grouping read these, never a rule of their own.
    phases: list[PhaseInfo] = Field(default_factory=list)

    @model_validator(mode="after")
    def _phases_cover_the_inputs(self) -> GraphInfo:
        used = {d for t in self.inputs for d in t.shape if isinstance(d, str)}
        for p in self.phases:
            if not used <= set(p.dims):
                raise ValueError(f"phase {p.name} gives no range for dims {sorted(used - set(p.dims))}")
        return self


class FileInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str
    size: int = Field(ge=0)


class BuildOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str
    dtype: str
    opset: int
    max_batch: int
    max_prompt: int
    max_new_tokens: int
    workspace_gib: float | None = None  # TensorRT builder workspace limit (TensorRT builds only)
    # Whether TensorRT could use TF32 for fp32 layers (TensorRT builds only). Artifacts from before the field were
    # built with TensorRT's default, TF32 on: read None as True where engines exist.
    tf32: bool | None = None
    # Image tokens per image of a family whose count follows the image's size (btp-compile --min-image-tokens,
    # --max-image-tokens; the saved processor resizes into them); 0 and 0: the model's fixed count.
    min_image_tokens: int = Field(0, ge=0)
    max_image_tokens: int = Field(0, ge=0)

    @property
    def bounds(self) -> Bounds:
        return Bounds(self.max_batch, self.max_prompt, self.max_new_tokens, self.min_image_tokens,
                      self.max_image_tokens)


Count = Annotated[StrictInt, Field(gt=0)]


class ModelInfo(BaseModel):
    """`manifest.model`: the model the artifact was built from (`LoadedModel.summary()`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr = Field(min_length=1)
    family: StrictStr = Field(min_length=1)
    num_layers: Count
    hidden_size: Count
    intermediate_size: Count
    image_tokens: Count
    grid: list[StrictInt] = Field(min_length=2, max_length=2)
    dtype: StrictStr
    fingerprint: StrictStr = Field(pattern=r"^[0-9a-f]{16,128}$")


class StageInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr = Field(min_length=1)
    layers: list[StrictInt] = Field(min_length=1)
    image_tokens: StrictInt = Field(ge=0)
    prune: StrictStr | None = None


class ChainInfo(BaseModel):
    """`manifest.chain`: the chain's layout (`ChainSpec.to_dict()`); `spec()` is the runtime's `ChainSpec`.

    The fields below are checked here; any other `ChainSpec` field (a family's own, such as its input preparation's
    sizes) is accepted as `ChainSpec.from_dict` reads it, and a key that is no `ChainSpec` field is refused."""

    model_config = ConfigDict(extra="allow", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _chain_spec_fields(cls, data):
        if isinstance(data, dict):
            known = ({f.name for f in fields(ChainSpec)} - {"bounds"}) | set(cls.model_fields)  # bounds: flat
            unknown = sorted(k for k in data if k not in known)
            if unknown:
                raise ValueError(f"unknown chain field(s) {unknown}: expected fields of the runtime's ChainSpec")
            families = ["llava", *FAMILY_INPUTS]  # LLaVA's inputs are the pipeline's own
            if isinstance(data.get("family"), str) and data["family"] not in families:
                raise ValueError(f"chain family: expected one of {families} (the families this runtime prepares "
                                 f"inputs for), found {data['family']!r}")
            for f in fields(ChainSpec):  # the others: of their default's type (a str, an int)
                if f.name in data and f.name not in cls.model_fields and isinstance(f.default, (str, int)) \
                        and type(data[f.name]) is not type(f.default):
                    raise ValueError(f"chain {f.name}: expected {type(f.default).__name__}, found "
                                     f"{data[f.name]!r}")
        return data

    stages: list[StageInfo] = Field(min_length=1)
    image_tokens: Count
    grid: list[StrictInt] = Field(min_length=2, max_length=2)
    image_size: Count
    image_token_id: StrictInt = Field(ge=0)
    pad_token_id: StrictInt = Field(ge=0)
    eos_token_ids: list[StrictInt] = Field(min_length=1)
    hidden_size: Count
    num_kv_heads: Count
    head_dim: Count
    dtype: StrictStr
    max_positions: Count
    max_prompt: Count
    max_batch: Count

    def spec(self) -> ChainSpec:
        return ChainSpec.from_dict(self.model_dump())


def _found(e: dict) -> str:
    """", found X" for a validation error `e` about a value (not for a missing one)."""
    if e["type"] == "missing" or "input" not in e:
        return ""
    found = repr(e["input"])
    return f", found {found if len(found) <= 40 else found[:37] + '...'}"


class Manifest(BaseModel):
    """Everything needed to load and check an artifact directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str
    producer: dict[str, str]
    model: ModelInfo
    plan: dict  # a record of the plan; `btp.compiler.plan.Plan.parse` reads it (runtime does not need it)
    chain: ChainInfo
    build: BuildOptions
    graphs: dict[str, GraphInfo]
    files: dict[str, FileInfo]
    processor: str = "processor"
    engines: dict[str, str] = Field(default_factory=dict)  # graph -> engines/{graph}.engine (TensorRT builds)
    tensorrt: str | None = None  # the TensorRT version that built them

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        """The parts agree: the chain's graphs are the listed graphs, its bounds are the build's, and its
        sizes are the model's."""
        m, c, b = self.model, self.chain, self.build

        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(what)

        need(c.image_tokens == m.image_tokens and c.grid == m.grid
             and m.grid[0] * m.grid[1] == m.image_tokens,
             f"chain has {c.image_tokens} image tokens on a {c.grid} grid, the model {m.image_tokens} on {m.grid}")
        need(c.hidden_size == m.hidden_size, f"chain hidden_size {c.hidden_size} differs from the model's "
             f"{m.hidden_size}")
        need(c.dtype == b.dtype, f"chain dtype {c.dtype} differs from the build's {b.dtype}")
        need(min(b.max_batch, b.max_prompt, b.max_new_tokens) > 0, "build bounds must be > 0")
        need((c.max_prompt, c.max_batch) == (b.max_prompt, b.max_batch),
             f"chain bounds (max_prompt {c.max_prompt}, max_batch {c.max_batch}) differ from the build's "
             f"({b.max_prompt}, {b.max_batch})")
        need(c.max_positions == b.max_prompt + b.max_new_tokens,
             f"chain max_positions {c.max_positions} is not the graphs' max_prompt + max_new_tokens "
             f"({b.max_prompt} + {b.max_new_tokens})")
        need(b.max_prompt > c.image_tokens, f"build max_prompt {b.max_prompt} cannot hold {c.image_tokens} image "
             "tokens and a question")
        lo, hi = b.min_image_tokens, b.max_image_tokens
        need((lo, hi) == (0, 0) or 1 <= lo <= hi < b.max_prompt, f"build image tokens {lo}..{hi}: expected 0..0 (a "
             f"fixed count) or 1 <= min <= max < max_prompt ({b.max_prompt})")
        layers = [layer for st in c.stages for layer in st.layers]
        need(layers == list(range(m.num_layers)), f"chain stages cover layers {layers}, expected "
             f"0..{m.num_layers - 1} in order")
        alive = [st.image_tokens for st in c.stages]
        need(all(0 <= a <= c.image_tokens for a in alive) and alive == sorted(alive, reverse=True),
             f"chain image tokens per stage {alive} must not grow and stay within {c.image_tokens}")
        names = {"vision", "embed", "head"} | {st.name for st in c.stages} | {st.prune for st in c.stages if st.prune}
        need(set(self.graphs) == names, f"graphs {sorted(self.graphs)} differ from the chain's {sorted(names)}")
        need(not self.engines or set(self.engines) == set(self.graphs),
             f"engines {sorted(self.engines)} differ from graphs {sorted(self.graphs)}")
        need((b.backend == "tensorrt") == bool(self.engines) and (self.tensorrt is not None) == bool(self.engines),
             f"build backend {b.backend!r} disagrees with {len(self.engines)} engines and tensorrt "
             f"{self.tensorrt!r}")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path, skip: tuple[str, ...] = (MANIFEST,)) -> dict[str, FileInfo]:
    """sha256 and size of every file under `root` (relative POSIX paths), except `skip`."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in skip:
            out[rel] = FileInfo(sha256=sha256_file(p), size=p.stat().st_size)
    return out


def read_manifest(root: str | Path, verify: bool = True) -> Manifest:
    """Read and validate `root/manifest.json`; with `verify`, check every listed file's size and sha256.

    Raises `ArtifactError` naming the file for a missing manifest, an unknown format, a missing file or a
    file whose size or sha256 differs from the manifest.
    """
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such artifact directory")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {root} is not a complete btp artifact")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{path}: {path.stat().st_size} bytes, more than a manifest's "
                                f"{MAX_MANIFEST_BYTES}; not a btp manifest")
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except RecursionError as err:
        raise ArtifactError(f"{path}: unreadable manifest (JSON nested too deeply)") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path}: unreadable manifest ({err})") from err
    found = data.get("format") if isinstance(data, dict) else None
    if found != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path}: unknown artifact format {found!r}, expected {ARTIFACT_FORMAT!r}")
    try:
        manifest = Manifest.model_validate_json(text, strict=True)  # "4" is not 4, [4] is not 4
    except ValidationError as err:
        e = err.errors()[0]
        # Union members and validators add their own names to the location ('constrained-int'): drop them.
        where = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and "-" in p and p[:1].islower()
                                                           and p.split("-")[0] in ("constrained", "function"))) \
            or "top level"
        msg = e["msg"].removeprefix("Value error, ") + ("" if e["type"] == "value_error" else _found(e))
        raise ArtifactError(f"{path}: invalid manifest at {where}: {msg}") from err
    except RecursionError as err:
        raise ArtifactError(f"{path}: invalid manifest (nested too deeply)") from err
    _check_paths(root, manifest)
    if verify:
        _check_closed_world(root, manifest)
        for rel, info in manifest.files.items():
            p = root / rel
            if not p.is_file():
                raise ArtifactError(f"{p}: missing (listed in {MANIFEST})")
            try:
                same = p.stat().st_size == info.size and sha256_file(p) == info.sha256
            except OSError as err:
                raise ArtifactError(f"{p}: cannot read it ({err.strerror or err})") from err
            if not same:
                raise ArtifactError(f"{p}: contents differ from {MANIFEST} (sha256 mismatch); rebuild the artifact")
        _check_external_data(root, manifest)
    return manifest


def _tensors(graph):
    """Every TensorProto of an ONNX graph: initializers and tensor attributes, subgraphs (Loop, If) included."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            yield from ([a.t] if a.HasField("t") else []) + list(a.tensors)
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _tensors(g)


def _check_external_data(root: Path, manifest: Manifest) -> None:
    """Weights an ONNX graph keeps in external files are read from listed files inside the artifact only."""
    import onnx

    listed = set(manifest.files)
    for name, info in manifest.graphs.items():
        try:
            model = onnx.load(str(root / info.file), load_external_data=False)
        except Exception as err:  # noqa: BLE001 - onnx raises its own and protobuf's types for a bad file
            raise ArtifactError(f"{root / info.file}: not a readable ONNX graph ({type(err).__name__})") from err
        base = PurePosixPath(info.file).parent
        for t in _tensors(model.graph):
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            rel = (base / loc).as_posix() if loc and not loc.startswith("/") and "\\" not in loc else loc
            if ".." in PurePosixPath(loc).parts or rel not in listed:
                raise ArtifactError(f"{root / info.file}: tensor {t.name} of graph {name} reads external data "
                                    f"{loc!r}, which is not a file listed inside the artifact")


def _relative(root: Path, rel: str, what: str) -> str:
    """`rel` if it is a normalised relative POSIX path inside the artifact, else `ArtifactError` naming it."""
    p = PurePosixPath(rel)
    if not rel or rel.startswith("/") or "\\" in rel or p.is_absolute() or ".." in p.parts or p.as_posix() != rel \
            or rel in (".", MANIFEST):
        raise ArtifactError(f"{root / MANIFEST}: {what} {rel!r} must be a relative path inside the artifact "
                            "(no absolute path, no '..', normalised)")
    return rel


def _check_paths(root: Path, manifest: Manifest) -> None:
    """Every path the manifest names stays inside the artifact, and every file the loader reads is listed."""
    for rel in manifest.files:
        _relative(root, rel, "listed file")
    listed = set(manifest.files)
    named = [(f"graph {n}'s file", g.file) for n, g in manifest.graphs.items()]
    named += [(f"graph {n}'s engine", e) for n, e in manifest.engines.items()]
    for what, rel in named:
        _relative(root, rel, what)
        if rel not in listed:
            raise ArtifactError(f"{root / rel}: {what} is not listed in {MANIFEST} files, so it cannot be verified")
    proc = _relative(root, manifest.processor, "processor directory")
    if not any(f.startswith(f"{proc}/") for f in listed):
        raise ArtifactError(f"{root / proc}: the processor directory has no file listed in {MANIFEST}")


def _check_closed_world(root: Path, manifest: Manifest) -> None:
    """No symbolic link anywhere in the artifact, and no file the manifest does not list (a file added to
    processor/, such as a chat template, would change every prompt without failing a checksum)."""
    listed = set(manifest.files) | {MANIFEST}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in [*dirnames, *filenames]:
            p = here / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                raise ArtifactError(f"{p}: a symbolic link inside the artifact; btp artifacts hold plain files only")
            if name in filenames and rel not in listed:
                raise ArtifactError(f"{p}: not listed in {MANIFEST}; an artifact holds only the files it lists "
                                    "(remove it, or rebuild the artifact)")
