"""btp-check: Polygraphy comparisons of every graph against the torch reference, and end-to-end tokens."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
from onnx import numpy_helper

from btp.runtime.manifest import MANIFEST, file_table, read_manifest
from btp.tools import check


def test_check_passes_on_a_fresh_artifact_and_saves_polygraphy_data(artifact, tmp_path, capsys):
    save = tmp_path / "pg"
    assert check.main([str(artifact("btp")), "--samples", "2", "--steps", "3", "--json", "--save", str(save)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["tokens"]["mean"] == 1.0
    graphs = {g["graph"]: g for g in report["graphs"]}
    assert set(graphs) == set(read_manifest(artifact("btp")).graphs)
    assert all(g["feeds"] >= 2 for g in graphs.values())  # captured from real runs
    assert graphs["stage1"]["feeds"] > graphs["prune1"]["feeds"]  # stages also run in decode
    assert (save / "prune1.inputs.json").is_file() and (save / "prune1.outputs.json").is_file()
    # The printed reproduction line works with Polygraphy's own CLI.
    polygraphy = shutil.which("polygraphy") or str(__import__("pathlib").Path(sys.executable).parent / "polygraphy")
    proc = subprocess.run([polygraphy, "run", str(artifact("btp") / "onnx" / "prune1.onnx"), "--onnxrt",
                           "--load-inputs", str(save / "prune1.inputs.json"),
                           "--load-outputs", str(save / "prune1.outputs.json"), "--atol", "1e-4", "--rtol", "1e-4"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_check_fails_naming_the_graph_and_output(artifact, tmp_path, capsys):
    root = tmp_path / "art"
    shutil.copytree(artifact("btp"), root)
    path = root / "onnx" / "head.onnx"
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.ndim == 2:  # the LM head weight: a 1% change, small enough to keep the file loadable
            init.CopyFrom(numpy_helper.from_array((arr * 1.01).astype(arr.dtype), init.name))
    onnx.save(model, str(path))
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["files"] = {k: v.model_dump() for k, v in file_table(root).items()}  # re-signed: only numbers differ
    (root / MANIFEST).write_text(json.dumps(manifest))
    assert check.main([str(root), "--samples", "1", "--steps", "2", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    failing = [g for g in report["graphs"] if not g["passed"]]
    assert [g["graph"] for g in failing] == ["head"]
    assert "logits" in failing[0]["failures"][0]
    assert not report["passed"]


def test_stat_failure_thresholds():
    x = np.linspace(-1, 1, 1000).astype(np.float32)
    assert check._stat_failure(x, x, "float16") is None
    assert check._stat_failure(x, x + 0.2, "float16") is not None


def test_fp16_artifact_passes_the_statistical_comparison(tmp_path, capsys):
    from btp.compiler.build import BuildConfig, compile_artifact
    from btp.compiler.export import Limits

    out = tmp_path / "f16"
    compile_artifact(BuildConfig(model="builtin:tiny-llava", plan="btp", out=out, dtype="float16",
                                 limits=Limits(max_prompt=256, max_new_tokens=16)))
    assert check.main([str(out), "--samples", "2", "--steps", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "float16" and report["passed"]
    worst = max(max(g["worst"].values(), default=0.0) for g in report["graphs"])
    assert 0 < worst < 1e-2  # fp16 is not exact, and is judged by statistics rather than 1e-4
