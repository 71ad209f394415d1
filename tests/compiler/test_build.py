"""`btp-compile` and the artifact it writes: bad input exits 2 with one line and leaves nothing behind."""

import json
import shutil

import pytest

from btp.artifact.manifest import ARTIFACT_FORMAT, MANIFEST, Manifest, read_manifest
from btp.cli import compile as cli
from btp.compiler import resolve_plan
from btp.compiler.build import BuildConfig, BuildError, compile_artifact
from btp.runtime import ArtifactError, Pipeline

SMALL = ["--max-prompt", "256", "--max-new-tokens", "64"]


def _run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(name) or p.name.startswith(f".{name}."))


def _foreign_plan(tiny, tmp_path):
    plan = resolve_plan("btp", tiny).model_dump(mode="json", by_alias=True)
    plan["model"]["fingerprint"] = "0" * 64
    path = tmp_path / "other.json"
    path.write_text(json.dumps(plan))
    return path


BAD = {
    "unknown-model": (["builtin:nope", "--plan", "btp"], "unknown builtin model"),
    "invalid-plan": (["builtin:tiny-llava", "--plan", "{bad}"], "stages[0].keep"),
    "unknown-plan": (["builtin:tiny-llava", "--plan", "nonsense"], "unknown plan 'nonsense'"),
    "foreign-plan": (["builtin:tiny-llava", "--plan", "{foreign}"], "model.fingerprint"),
    "small-prompt": (["builtin:tiny-llava", "--plan", "btp", "--max-prompt", "64"], "--max-prompt 64"),
    "bad-opset": (["builtin:tiny-llava", "--plan", "btp", "--opset", "13"], "--opset must be in 17..20"),
    "zero-workspace": (["builtin:tiny-llava", "--plan", "btp", "--workspace", "0"], "--workspace must be"),
    "negative-workspace": (["builtin:tiny-llava", "--plan", "btp", "--workspace", "-1"], "got -1.0"),
    "nan-workspace": (["builtin:tiny-llava", "--plan", "btp", "--workspace", "nan"], "--workspace must be"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line_and_no_output(case, tiny, tmp_path, capsys):
    argv, message = BAD[case]
    bad_plan = tmp_path / "bad.json"
    bad = resolve_plan("btp", tiny).model_dump(mode="json", by_alias=True)
    bad["stages"][0]["keep"] = 65
    bad_plan.write_text(json.dumps(bad))
    argv = [a.replace("{bad}", str(bad_plan)).replace("{foreign}", str(_foreign_plan(tiny, tmp_path)))
            for a in argv]
    out = tmp_path / "out"
    code, _, err = _run([*argv[:1], *SMALL, *argv[1:], "-o", str(out)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("btp-compile: error: ") and message in lines[0], err
    assert not out.exists() and _leftovers(tmp_path, "out") == []


def test_existing_out_without_force_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, _, err = _run(["builtin:tiny-llava", "--plan", "btp", "-o", str(out), *SMALL], capsys)
    assert code == 2 and "already exists; pass --force" in err and len(err.strip().splitlines()) == 1
    assert (out / "mine.txt").read_text() == "keep me"


def test_unwritable_out_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = _run(["builtin:tiny-llava", "--plan", "btp", "-o", str(blocker / "out"), *SMALL], capsys)
    assert code == 2 and "cannot write the artifact" in err and len(err.strip().splitlines()) == 1


def test_failure_mid_build_leaves_nothing(tmp_path, monkeypatch):
    import btp.compiler.build as build

    calls = {"n": 0}
    real = build.export_graph

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "export_graph", failing)
    out = tmp_path / "out"
    with pytest.raises(build.BuildError, match="No space left on device"):
        compile_artifact(BuildConfig(model="builtin:tiny-llava", plan="btp", out=out))
    assert calls["n"] == 3
    assert list(tmp_path.iterdir()) == []


def test_manifest_describes_the_artifact(artifact):
    root = artifact("btp")
    m = read_manifest(root)
    assert m.format == ARTIFACT_FORMAT and m.producer["name"] == "btp"
    assert list(m.graphs) == ["vision", "embed", "stage0", "prune1", "stage1", "prune2", "stage2", "prune3",
                              "stage3", "prune4", "stage4", "head"]
    assert m.graphs["prune1"].outputs[0].shape == ["batch", "seq - 32", 64]
    assert m.graphs["stage0"].exporter.startswith("torch.onnx.export(dynamo=True)")
    assert m.plan["stages"][0]["keep"] == 32 and m.model.image_tokens == 64
    assert all(rel in m.files for rel in ("onnx/prune1.onnx", "processor/tokenizer.json"))
    assert m.build.max_prompt == 256


def test_force_replaces_an_existing_artifact(artifact, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(artifact("fastv"), out)
    code, stdout, _ = _run(["builtin:tiny-llava", "--plan", "none", "-o", str(out), "--force", *SMALL], capsys)
    assert code == 0 and "head" in stdout
    assert read_manifest(out).plan["stages"] == []
    assert _leftovers(tmp_path, "out") == ["out"]


@pytest.fixture
def copy_of(artifact, tmp_path):
    def make(preset="btp"):
        dst = tmp_path / "copy"
        shutil.copytree(artifact(preset), dst)
        return dst

    return make


def test_tampered_graph_is_refused_naming_the_file(copy_of):
    root = copy_of()
    path = root / "onnx" / "stage1.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"stage1\.onnx: contents differ"):
        Pipeline.load(root)


def test_missing_file_and_unknown_format_are_refused(copy_of):
    root = copy_of()
    (root / "onnx" / "head.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"head\.onnx: missing"):
        Pipeline.load(root)
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["format"] = "btp-artifact/99"
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="unknown artifact format 'btp-artifact/99'"):
        Pipeline.load(root)
    (root / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        Pipeline.load(root)


def test_graph_io_that_disagrees_with_the_manifest_is_refused(copy_of):
    root = copy_of()
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["graphs"]["prune2"]["outputs"][3]["name"] = "kept"
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"prune2\.onnx: graph outputs .* disagree with the manifest"):
        Pipeline.load(root)


def test_workspace_option_reaches_the_build_config(monkeypatch, tmp_path, capsys):
    assert cli.parser().parse_args(["m", "--plan", "btp", "-o", "x"]).workspace == 4.0
    assert cli.parser().parse_args(["m", "--plan", "btp", "-o", "x", "--workspace", "2.5"]).workspace == 2.5
    with pytest.raises(SystemExit) as exc:  # not a number: argparse's usage error, exit 2
        cli.parser().parse_args(["m", "--plan", "btp", "-o", "x", "--workspace", "lots"])
    assert exc.value.code == 2
    seen = []

    def fake_compile(cfg, on_graph=None):
        seen.append(cfg)
        raise BuildError("stop here")

    monkeypatch.setattr(cli, "compile_artifact", fake_compile)
    code, _, err = _run(["builtin:tiny-llava", "--plan", "btp", "-o", str(tmp_path / "o"), "--workspace", "0.5"],
                        capsys)
    assert code == 2 and "stop here" in err
    assert seen[0].workspace_gib == 0.5 and BuildConfig(model="m", plan="btp", out=tmp_path).workspace_gib == 4.0


def test_onnxruntime_builds_record_no_workspace_and_older_manifests_still_read(artifact):
    root = artifact("btp")
    assert read_manifest(root).build.workspace_gib is None  # a TensorRT build option only
    data = json.loads((root / MANIFEST).read_text())
    del data["build"]["workspace_gib"]  # written before the field existed
    assert Manifest.model_validate(data).build.workspace_gib is None


def test_compiling_writes_nothing_to_stdout(tmp_path, capsys):
    """`--json` reports of the commands that compile in-process (btp-bench, btp-bench-quality) own stdout: the
    exporter's chatter (onnxscript 0.6 prints its rewrite passes) goes to stderr."""
    from btp.compiler.build import BuildConfig, compile_artifact
    from btp.compiler.export import Limits

    compile_artifact(BuildConfig(model="builtin:tiny-llava", plan="divprune", out=tmp_path / "a",
                                 limits=Limits(max_batch=2, max_prompt=128, max_new_tokens=8)))
    assert capsys.readouterr().out == ""
