"""`btp-run`: answers, JSON, the explain figure, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from btp.cli import run

SAMPLE = "tools/data/sample.png"


@pytest.fixture(scope="module")
def art(artifact):
    return str(artifact("btp"))


def test_streams_an_answer_and_reports_kept_tokens(art, capsys):
    assert run.main([art, "--image", SAMPLE, "--prompt", "What is shown?", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr()
    assert out.out.endswith("\n") and "image tokens kept (of 64): prune1 32, prune2 16, prune3 5, prune4 0" in out.err


def test_json_output(art, capsys):
    assert run.main([art, "--image", SAMPLE, "--prompt", "What is shown?", "--max-new-tokens", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"text", "token_ids", "kept_indices", "timings"}
    assert [len(v) for v in doc["kept_indices"].values()] == [32, 16, 5, 0]
    assert doc["timings"]["ttft_ms"] > 0 and doc["timings"]["prune1"] > 0 and len(doc["token_ids"]) <= 4


def test_explain_writes_one_panel_per_stage(art, tmp_path, capsys):
    png = tmp_path / "kept.png"
    assert run.main([art, "--image", SAMPLE, "--prompt", "Hi", "--max-new-tokens", "1", "--explain", str(png)]) == 0
    with Image.open(png) as im:
        assert im.width > 4 * im.height  # input + 4 stage panels side by side


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "nope.png", "--prompt", "Hi"], "nope.png: no such image file"),
        (["--image", "README.md", "--prompt", "Hi"], "README.md: not a readable image"),
        (["--image", SAMPLE, "--prompt", "<image> and <image>"], "exactly one <image> placeholder, found 2"),
        (["--image", SAMPLE, "--prompt", "word " * 300], "prompt too long"),
    ],
)
def test_bad_input_exits_2_with_one_line(art, capsys, args, message):
    assert run.main([art, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("btp-run: error: ") and message in err[0]


def test_not_an_artifact_exits_2(tmp_path, capsys):
    assert run.main([str(tmp_path), "--image", SAMPLE, "--prompt", "Hi"]) == 2
    assert "manifest.json: missing" in capsys.readouterr().err


def test_missing_image_is_a_usage_error(art, capsys):
    with pytest.raises(SystemExit) as err:
        run.main([art, "--prompt", "What is shown?"])
    assert err.value.code == 2 and "--image" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "array", "expected"),
    [
        ("g16.png", np.full((40, 48), 32768, np.uint16), 128),  # Pillow opens it as I;16 (or I, by version)
        ("i32.tif", np.full((40, 48), 32768, np.int32), 128),
        ("f32.tif", np.full((40, 48), 0.5, np.float32), 128),
    ],
)
def test_open_image_scales_high_bit_depth_instead_of_saturating(tmp_path, name, array, expected):
    Image.fromarray(array).save(tmp_path / name)
    image = run.open_image(str(tmp_path / name))
    assert image.mode == "RGB" and image.size == (48, 40)
    assert np.asarray(image).min() == np.asarray(image).max() == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([b"--image", SAMPLE.encode(), b"--prompt", b"What is \xff shown?"],
         "--prompt: not valid UTF-8 text: expected UTF-8, found the byte 0xff at character 8"),
        ([b"--image", b"README.md", b"--prompt", b"Hi"], "README.md: not a readable image"),
    ],
)
def test_bad_input_in_a_real_process_is_one_line_on_stderr(art, args, message):
    proc = subprocess.run([sys.executable.encode(), b"-m", b"btp.cli.run", art.encode(), *args,
                           b"--max-new-tokens", b"2"], capture_output=True, timeout=120)
    err = proc.stderr.decode("utf-8", "replace").splitlines()
    assert proc.returncode == 2 and proc.stdout == b""
    assert len(err) == 1 and err[0].startswith("btp-run: error: ") and message in err[0]
