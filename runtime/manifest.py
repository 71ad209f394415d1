"""The artifact manifest (ARCHITECTURE section 5): a frozen, validated document beside the graphs.

`compiler` writes it; `Pipeline.load` reads it and checks every file against it before running anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ArtifactError

ARTIFACT_FORMAT = "btp-artifact/1"
MANIFEST = "manifest.json"


class TensorInfo(BaseModel):
    """One graph input or output: name, dtype name (torch spelling) and shape (symbolic dims as strings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    dtype: str
    shape: list[int | str]


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


class Manifest(BaseModel):
    """Everything needed to load and check an artifact directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str
    producer: dict[str, str]
    model: dict
    plan: dict
    chain: dict
    build: BuildOptions
    graphs: dict[str, GraphInfo]
    files: dict[str, FileInfo]
    processor: str = "processor"
    engines: dict[str, str] = Field(default_factory=dict)  # graph -> engines/{graph}.engine (TensorRT builds)
    tensorrt: str | None = None  # the TensorRT version that built them

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
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path}: unreadable manifest ({err})") from err
    found = data.get("format") if isinstance(data, dict) else None
    if found != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path}: unknown artifact format {found!r}, expected {ARTIFACT_FORMAT!r}")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        raise ArtifactError(f"{path}: invalid manifest at {'.'.join(map(str, e['loc']))}: {e['msg']}") from err
    _check_paths(root, manifest)
    if verify:
        _check_closed_world(root, manifest)
        for rel, info in manifest.files.items():
            p = root / rel
            if not p.is_file():
                raise ArtifactError(f"{p}: missing (listed in {MANIFEST})")
            if p.stat().st_size != info.size or sha256_file(p) != info.sha256:
                raise ArtifactError(f"{p}: contents differ from {MANIFEST} (sha256 mismatch); rebuild the artifact")
    return manifest


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
