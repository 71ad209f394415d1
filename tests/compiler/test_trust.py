"""Artifacts as a trust boundary: the manifest's paths stay inside, unlisted files and links are refused, and
`--force` replaces only what a build made."""

import json
import shutil

import pytest

from btp.artifact.manifest import MANIFEST, read_manifest
from btp.cli.compile import main as compile_main
from btp.runtime import ArtifactError, Pipeline


@pytest.fixture
def copy(artifact, tmp_path):
    """A private copy of the btp artifact of builtin:tiny-llava, and a way to edit its manifest."""
    root = tmp_path / "art"
    shutil.copytree(artifact("btp"), root)

    def edit(change):
        doc = json.loads((root / MANIFEST).read_text())
        change(doc)
        (root / MANIFEST).write_text(json.dumps(doc))
        return root

    return root, edit


def _refused(root, match):
    with pytest.raises(ArtifactError, match=match):
        Pipeline.load(root)


@pytest.mark.parametrize("path", ["/etc/hostname", "../outside/head.onnx", "onnx/../onnx/head.onnx", "./onnx/head.onnx",
                                  "onnx\\head.onnx"])
def test_graph_paths_outside_or_unnormalised_are_refused(copy, path):
    root, edit = copy
    edit(lambda d: d["graphs"]["head"].update(file=path))
    _refused(root, "must be a relative path inside the artifact")


def test_a_graph_missing_from_the_file_list_is_refused(copy):
    root, edit = copy
    edit(lambda d: d["files"].pop("onnx/head.onnx"))
    _refused(root, "graph head's file is not listed")


def test_listed_files_outside_the_artifact_are_refused_without_reading_them(copy, tmp_path):
    root, edit = copy
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    edit(lambda d: d["files"].update({str(secret): {"sha256": "0" * 64, "size": 9}}))
    _refused(root, "listed file .* must be a relative path inside the artifact")


def test_the_processor_directory_must_stay_inside(copy):
    root, edit = copy
    edit(lambda d: d.update(processor="../elsewhere"))
    _refused(root, "processor directory '../elsewhere' must be a relative path")


def test_an_unlisted_chat_template_is_refused(copy):
    root, _ = copy
    (root / "processor" / "chat_template.json").write_text('{"chat_template": "{{ messages }}"}')
    _refused(root, r"processor/chat_template.json: not listed in manifest.json")


def test_symbolic_links_inside_the_artifact_are_refused(copy, tmp_path):
    root, _ = copy
    real = tmp_path / "head-copy.onnx"
    shutil.copy(root / "onnx" / "head.onnx", real)
    (root / "onnx" / "head.onnx").unlink()
    (root / "onnx" / "head.onnx").symlink_to(real)
    _refused(root, "head.onnx: a symbolic link inside the artifact")


def test_the_untampered_copy_loads(copy):
    root, _ = copy
    assert read_manifest(root).graphs["head"].file == "onnx/head.onnx"
    Pipeline.load(root)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """builtin:tiny-llava saved as a Hugging Face checkpoint, with a file of the user's beside it."""
    from btp.compiler import load_model

    root = tmp_path_factory.mktemp("ckpt") / "tiny"
    model = load_model("builtin:tiny-llava")
    model.hf.save_pretrained(root)
    model.processor.save_pretrained(root)
    (root / "notes.txt").write_text("mine")
    return root


def _snapshot(root):
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*"))


@pytest.mark.parametrize("out", ["{ckpt}", "{ckpt}/..", "{ckpt}/sub"])
def test_force_never_replaces_the_models_own_directory(checkpoint, capsys, out):
    target = out.format(ckpt=checkpoint)
    if target.endswith("/sub"):
        (checkpoint / "sub").mkdir(exist_ok=True)
        (checkpoint / "sub" / "keep.txt").write_text("x")
    before = _snapshot(checkpoint)
    assert compile_main([str(checkpoint), "--plan", "none", "-o", target, "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force would replace the model's own files" in err[0]
    assert _snapshot(checkpoint) == before


def test_force_refuses_a_directory_that_is_not_an_artifact(tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    assert compile_main(["builtin:tiny-llava", "--plan", "none", "-o", str(out), "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a btp artifact" in err[0] and "nothing was deleted" in err[0]
    assert (out / "holiday.jpg").read_bytes() == b"\xff\xd8"


def test_force_may_fill_an_empty_directory(tmp_path):
    from btp.compiler.build import _check_out

    empty = tmp_path / "empty"
    empty.mkdir()
    _check_out(empty, force=True, model="builtin:tiny-llava")  # no error: nothing to lose


# ------------------------------------------------------------------ inputs bounded before work
@pytest.mark.parametrize(("size", "message"), [
    ((100000, 1), "aspect ratio of 100000:1"),
    ((2000, 1), "aspect ratio of 2000:1"),
    ((9000, 9000), "more than the 64000000 accepted"),
])
def test_hostile_image_sizes_are_refused_before_any_decode(tmp_path, capsys, artifact, size, message):
    """A few hundred bytes of PNG can declare a huge or extremely elongated image; the CLI refuses it from the
    header, before Pillow decodes it or the processor resizes it."""
    from PIL import Image

    from btp.cli import run

    path = tmp_path / "hostile.png"
    Image.new("L", size).save(path, optimize=True)
    assert path.stat().st_size < 200_000
    assert run.main([str(artifact("btp")), "--image", str(path), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("btp-run: error: ") and message in err[0]


def test_pipeline_refuses_elongated_images_too(artifact):
    from PIL import Image

    from btp.runtime import InputError

    pipe = Pipeline.load(artifact("btp"))
    with pytest.raises(InputError, match="image 0: 500x10 has an aspect ratio of 50:1"):
        pipe.generate([Image.new("RGB", (500, 10))], ["Hi"], max_new_tokens=1)


def test_threads_and_new_tokens_beyond_their_bounds_are_input_errors(artifact, capsys):
    import os

    from btp.cli import run

    art = str(artifact("btp"))
    assert run.main([art, "--image", "tools/data/sample.png", "--prompt", "Hi", "--threads", "1000000"]) == 2
    assert f"threads must be 0 (ONNX Runtime's choice) to {os.cpu_count()}" in capsys.readouterr().err
    assert run.main([art, "--image", "tools/data/sample.png", "--prompt", "Hi", "--max-new-tokens", "65"]) == 2
    assert "max_new_tokens 65 exceeds the artifact's bound 64" in capsys.readouterr().err


# ------------------------------------------------------------------ the manifest is a validated document
def _nodes(doc, path=()):
    """Every (path, value) below the root of a JSON document: leaves and containers."""
    if path:
        yield path, doc
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for k, v in items:
        yield from _nodes(v, (*path, k))


def _wrong_type(value):
    """A value of another JSON type than `value`."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return 7
    if isinstance(value, list):
        return {"0": value}
    if isinstance(value, dict):
        return [value]
    return []  # null


def _set(doc, path, value):
    for k in path[:-1]:
        doc = doc[k]
    doc[path[-1]] = value


def test_every_manifest_field_of_a_wrong_type_is_an_artifact_error(copy):
    """The tampering matrix over the manifest's fields: each one given a value of another JSON type is refused
    with a one-line ArtifactError naming the manifest, except inside `plan` (a record of the plan, read and
    validated as a plan by the tools that use it) and a shape's dims, which may be ints or names (checked
    against the graphs when loading, below)."""
    root, _ = copy
    original = json.loads((root / MANIFEST).read_text())
    paths = [p for p, _ in _nodes(original) if p[0] != "plan" and not (len(p) > 1 and p[-2] == "shape")]
    assert len(paths) > 300  # every graph's inputs and outputs, every file, the chain, the build
    accepted = []
    for path in paths:
        doc = json.loads(json.dumps(original))
        _set(doc, path, _wrong_type(_get(doc, path)))
        (root / MANIFEST).write_text(json.dumps(doc))
        try:
            read_manifest(root, verify=False)
        except ArtifactError as err:
            assert "\n" not in str(err) and str(root / MANIFEST) in str(err)
        else:
            accepted.append(path)
    assert accepted == [], f"accepted with a wrong type: {accepted[:5]}"


def test_every_graphs_dims_are_checked_against_the_graph(copy):
    """A dim renamed, made a number or a number made a name: refused when the graph says otherwise."""
    root, _ = copy
    original = json.loads((root / MANIFEST).read_text())
    for name, graph in original["graphs"].items():
        for kind in ("inputs", "outputs"):
            dims = graph[kind][0]["shape"]
            for i, d in enumerate(dims):
                doc = json.loads(json.dumps(original))
                doc["graphs"][name][kind][0]["shape"][i] = d + 1 if isinstance(d, int) else 7
                (root / MANIFEST).write_text(json.dumps(doc))
                _refused(root, f"{name}.onnx: {kind[:-1]} .* has shape .* the manifest says")


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


@pytest.mark.parametrize(("change", "match"), [
    (lambda d: d["chain"].update(image_token_id=d["chain"]["image_token_id"] + 1), "is not the processor's"),
    (lambda d: d["chain"].update(pad_token_id=d["chain"]["pad_token_id"] + 1), "pad_token_id .* is not the"),
    (lambda d: d["chain"].update(eos_token_ids=[10**6]), "outside the processor's vocabulary"),
    (lambda d: d["chain"].update(max_prompt=d["chain"]["max_prompt"] + 1), "chain bounds .* differ from the build"),
    (lambda d: d["build"].update(max_batch=d["build"]["max_batch"] + 1), "chain bounds .* differ from the build"),
    (lambda d: d["build"].update(max_new_tokens=d["build"]["max_new_tokens"] + 1), "max_positions .* is not"),
    (lambda d: (d["build"].update(max_prompt=4096), d["chain"].update(max_prompt=4096, max_positions=4096 + 64)),
     "the graph was built for max_prompt 256, the manifest says 4096"),
    (lambda d: d["chain"].update(image_tokens=d["chain"]["image_tokens"] - 1), "chain has .* image tokens"),
    (lambda d: d["chain"]["stages"][0].update(layers=[1, 0]), "chain stages cover layers"),
    (lambda d: d["chain"]["stages"][-1].update(image_tokens=10**4), "must not grow"),
    (lambda d: d["chain"]["stages"][0].update(name="stage9"), "differ from the chain's"),
    (lambda d: d["chain"].update(dtype="float16"), "chain dtype float16 differs"),
    (lambda d: d["model"].update(fingerprint="not-hex"), "at model.fingerprint: String should match .* found"),
    (lambda d: d["build"].update(backend="tensorrt"), "disagrees with 0 engines"),
    (lambda d: d["graphs"]["head"]["inputs"][0]["shape"].__setitem__(0, 3), "has shape .* the manifest says"),
    (lambda d: d["graphs"]["head"]["outputs"][0].update(dtype="float16"), "the manifest says float16"),
    (lambda d: d["graphs"]["head"]["outputs"][0].update(dtype="complex64"), "head.outputs.0.dtype"),
])
def test_inconsistent_manifests_are_refused(copy, change, match):
    root, edit = copy
    edit(change)
    _refused(root, match)


def test_manifest_nested_too_deeply_is_one_line(copy, capsys):
    from btp.cli import run

    root, _ = copy
    (root / MANIFEST).write_text('{"format": "btp-artifact/1", "model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert run.main([str(root), "--image", "tools/data/sample.png", "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest.json" in err[0] and "nested too deeply" in err[0]


def test_plan_nested_too_deeply_is_one_line(tmp_path, capsys):
    plan = tmp_path / "deep.json"
    plan.write_text('{"format": "btp-plan/1", "stages": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert compile_main(["builtin:tiny-llava", "--plan", str(plan), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nested too deeply" in err[0]
    assert not (tmp_path / "out").exists()


def test_an_unreadable_listed_file_is_an_artifact_error(copy, monkeypatch):
    """Tests run as root here, where permissions do not stop a read: the OS error is raised where the file is
    read instead."""
    import errno

    from btp.artifact import manifest as m

    root, _ = copy
    real = m.sha256_file

    def denied(path, *a, **k):
        if path.name == "head.onnx":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(m, "sha256_file", denied)
    _refused(root, r"head.onnx: cannot read it \(Permission denied\)")


# ------------------------------------------------------------------ every file kind, tampered
def _kinds(root):
    """One file per kind in the artifact: each graph, each processor file."""
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert any(f.startswith("onnx/") for f in files) and any(f.startswith("processor/") for f in files)
    return [f for f in files if f != MANIFEST]


@pytest.mark.parametrize("how", ["flip", "truncate", "delete", "symlink", "directory", "extra-beside"])
def test_every_file_of_the_artifact_tampered_is_refused(copy, tmp_path, how):
    root, _ = copy
    pristine = tmp_path / "pristine"
    shutil.copytree(root, pristine)
    for rel in _kinds(pristine):
        shutil.rmtree(root)
        shutil.copytree(pristine, root)
        p = root / rel
        if how == "flip":
            data = bytearray(p.read_bytes())
            data[len(data) // 2] ^= 0x01
            p.write_bytes(bytes(data))
        elif how == "truncate":
            p.write_bytes(p.read_bytes()[:-1])
        elif how == "delete":
            p.unlink()
        elif how == "symlink":
            outside = tmp_path / "outside"
            shutil.copy(p, outside)
            p.unlink()
            p.symlink_to(outside)
        elif how == "directory":
            p.unlink()
            p.mkdir()
        else:
            (p.parent / f"extra-{p.name}").write_bytes(p.read_bytes())
        with pytest.raises(ArtifactError) as err:
            Pipeline.load(root)
        assert "\n" not in str(err.value) and rel.split("/")[0] in str(err.value), (rel, how, err.value)


def _externalise(root, graph, location, listed=True):
    """Move `graph`'s weights to an external file at `location` (relative to the graph) and re-list the
    artifact's files, as a careful tamperer would."""
    import onnx

    from btp.artifact.manifest import file_table

    path = root / "onnx" / f"{graph}.onnx"
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=1024,
              all_tensors_to_one_file=True)
    target = (path.parent / location)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target != path.parent / "weights.bin":
        shutil.move(path.parent / "weights.bin", target)
        model = onnx.load(str(path), load_external_data=False)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        path.write_bytes(model.SerializeToString())
    doc = json.loads((root / MANIFEST).read_text())
    files = {k: v.model_dump() for k, v in file_table(root).items()}
    if not listed:
        files.pop(f"onnx/{location}", None)
    doc["files"] = files
    (root / MANIFEST).write_text(json.dumps(doc))


def test_external_weights_inside_and_listed_load(copy):
    root, _ = copy
    _externalise(root, "head", "head.weights")
    assert "onnx/head.weights" in read_manifest(root).files
    Pipeline.load(root)


@pytest.mark.parametrize(("location", "match"), [
    ("../outside.bin", "reads external data '../outside.bin', which is not a file listed inside"),
    ("sub/../../outside.bin", "reads external data 'sub/../../outside.bin'"),
])
def test_external_weights_outside_the_artifact_are_refused(copy, location, match):
    root, _ = copy
    _externalise(root, "head", location)
    _refused(root, match)


def test_unlisted_external_weights_are_refused(copy):
    root, _ = copy
    _externalise(root, "head", "head.weights", listed=False)
    _refused(root, "onnx/head.weights: not listed in manifest.json")
