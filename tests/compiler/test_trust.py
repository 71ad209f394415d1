"""Artifacts as a trust boundary: the manifest's paths stay inside, unlisted files and links are refused, and
`--force` replaces only what a build made."""

import json
import shutil

import pytest

from btp.compiler.cli import main as compile_main
from btp.runtime import ArtifactError, Pipeline
from btp.runtime.manifest import MANIFEST, read_manifest


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

    from btp.tools import run

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

    from btp.tools import run

    art = str(artifact("btp"))
    assert run.main([art, "--image", "tools/data/sample.png", "--prompt", "Hi", "--threads", "1000000"]) == 2
    assert f"threads must be 0 (ONNX Runtime's choice) to {os.cpu_count()}" in capsys.readouterr().err
    assert run.main([art, "--image", "tools/data/sample.png", "--prompt", "Hi", "--max-new-tokens", "65"]) == 2
    assert "max_new_tokens 65 exceeds the artifact's bound 64" in capsys.readouterr().err
