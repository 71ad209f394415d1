"""The calibration set: builtin scenes (determinism, variety), prompts.jsonl directories, their errors, split."""

import json

import numpy as np
import pytest
from PIL import Image

from btp.compiler.calibration_data import DataError, Sample, builtin_samples, load_samples, split
from btp.runtime.errors import InputError


def pixels(sample):
    return np.asarray(sample.image)


# --------------------------------------------------------------------------------------------- builtin
def test_builtin_is_deterministic():
    a, b = builtin_samples(8, seed=3), builtin_samples(8, seed=3)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    for x, y in zip(a, b):
        assert np.array_equal(pixels(x), pixels(y))


def test_builtin_smaller_n_is_a_prefix():
    small, big = builtin_samples(4, seed=1), builtin_samples(10, seed=1)
    assert [s.prompt for s in small] == [s.prompt for s in big[:4]]
    assert all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(small, big))


def test_builtin_is_varied():
    samples = builtin_samples(16)
    assert len({s.prompt for s in samples}) >= 3
    assert len({pixels(s).tobytes() for s in samples}) == 16
    for s in samples:
        assert isinstance(s, Sample)
        assert s.image.mode == "RGB" and s.image.size == (96, 96)
        assert s.prompt.strip() and "<image>" not in s.prompt
        assert len(np.unique(pixels(s).reshape(-1, 3), axis=0)) >= 2  # a background and at least one shape
    assert [s.source for s in samples[:3]] == ["builtin:1", "builtin:2", "builtin:3"]


def test_builtin_seeds_differ():
    a, b = builtin_samples(6, seed=0), builtin_samples(6, seed=1)
    assert any(not np.array_equal(pixels(x), pixels(y)) for x, y in zip(a, b))
    assert [s.prompt for s in a] != [s.prompt for s in b]


def test_builtin_does_not_touch_global_rng():
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    builtin_samples(4)
    assert random.random() == expected


def test_builtin_prompts_refer_to_scene_vocabulary():
    from btp.toy.task import COLOURS, SHAPES

    words = set(COLOURS) | set(SHAPES) | {"describe", "see", "scene", "objects", "colours", "object", "crosses"}
    for s in builtin_samples(40, seed=7):
        tokens = {w.strip("?.,").lower() for w in s.prompt.split()}
        tokens |= {t[:-1] for t in tokens if t.endswith("s")}
        assert tokens & words, s.prompt


def test_builtin_size_and_load_samples_builtin():
    assert builtin_samples(2, size=64)[0].image.size == (64, 64)
    via = load_samples("builtin", n=5, seed=2)
    direct = builtin_samples(5, seed=2)
    assert [s.prompt for s in via] == [s.prompt for s in direct]
    assert all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(via, direct))


def test_builtin_rejects_bad_counts():
    with pytest.raises(DataError):
        builtin_samples(0)
    with pytest.raises(DataError):
        load_samples("builtin", n=0)


# --------------------------------------------------------------------------------------------- directory
def write_image(path, colour=(10, 200, 30), size=(20, 16), mode="RGB"):
    Image.new(mode, size, colour).save(path)


def make_dir(tmp_path, lines, images=("a.png",)):
    for name in images:
        write_image(tmp_path / name)
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


def entry(image="a.png", prompt="What is this?"):
    return json.dumps({"image": image, "prompt": prompt})


def test_directory_round_trip(tmp_path):
    write_image(tmp_path / "a.png", (255, 0, 0))
    write_image(tmp_path / "b.png", 128, mode="L")
    (tmp_path / "sub").mkdir()
    write_image(tmp_path / "sub" / "c.png", (0, 0, 255, 128), mode="RGBA")
    lines = [entry("a.png", "What colour is it?"), "", "   ", entry("b.png", "<image>\nDescribe it."),
             entry(str(tmp_path / "sub" / "c.png"), "Absolute path.")]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    samples = load_samples(str(tmp_path))
    assert [s.prompt for s in samples] == ["What colour is it?", "<image>\nDescribe it.", "Absolute path."]
    assert [s.source for s in samples] == [f"{tmp_path / 'prompts.jsonl'}:{n}" for n in (1, 4, 5)]
    assert all(s.image.mode == "RGB" and s.image.size == (20, 16) for s in samples)
    assert tuple(pixels(samples[0])[0, 0]) == (255, 0, 0)
    assert tuple(pixels(samples[1])[0, 0]) == (128, 128, 128)
    # the images are fully loaded: deleting the files afterwards does not matter
    for p in ("a.png", "b.png", "sub/c.png"):
        (tmp_path / p).unlink()
    assert pixels(samples[2]).shape == (16, 20, 3)


def test_directory_first_n_in_file_order(tmp_path):
    make_dir(tmp_path, [entry(prompt=f"q{i}") for i in range(5)] + ["not json at all"])
    assert [s.prompt for s in load_samples(str(tmp_path), n=3)] == ["q0", "q1", "q2"]
    assert [s.prompt for s in load_samples(str(tmp_path), n=5)] == [f"q{i}" for i in range(5)]
    make_dir(tmp_path, [entry(prompt="only")])
    assert [s.prompt for s in load_samples(str(tmp_path), n=64)] == ["only"]


def data_error(spec, n=64):
    with pytest.raises(DataError) as info:
        load_samples(str(spec), n=n)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert isinstance(info.value, InputError)
    return msg


def test_missing_directory(tmp_path):
    assert str(tmp_path / "nope") in data_error(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    assert "file.txt" in data_error(tmp_path / "file.txt")


def test_missing_prompts_file(tmp_path):
    write_image(tmp_path / "a.png")
    assert "prompts.jsonl" in data_error(tmp_path)


def test_empty_prompts_file(tmp_path):
    (tmp_path / "prompts.jsonl").write_text("\n  \n\n")
    msg = data_error(tmp_path)
    assert "prompts.jsonl" in msg and "no samples" in msg


def test_bad_n(tmp_path):
    make_dir(tmp_path, [entry()])
    assert "at least 1" in data_error(tmp_path, n=0)


LINE_ERRORS = [
    ("{not json", "not valid JSON"),
    ('["a.png", "q"]', "expected an object"),
    ('"just a string"', "expected an object"),
    ('{"prompt": "q"}', "missing key 'image'"),
    ('{"image": "a.png"}', "missing key 'prompt'"),
    ('{"image": 3, "prompt": "q"}', "'image' must be a string"),
    ('{"image": "a.png", "prompt": ["q"]}', "'prompt' must be a string"),
    ('{"image": "a.png", "prompt": null}', "'prompt' must be a string"),
    ('{"image": "a.png", "prompt": ""}', "'prompt' is empty"),
    ('{"image": "a.png", "prompt": "  \\n "}', "'prompt' is empty"),
    ('{"image": "a.png", "prompt": "<image> and <image>"}', "placeholders"),
    ('{"image": "missing.png", "prompt": "q"}', "missing.png"),
    ('{"image": "sub", "prompt": "q"}', "not found"),
    ('{"image": "bad.png", "prompt": "q"}', "cannot be read"),
    ('{"image": "trunc.png", "prompt": "q"}', "cannot be read"),
]


@pytest.mark.parametrize(("line", "expected"), LINE_ERRORS)
def test_line_errors_name_file_and_line(tmp_path, line, expected):
    make_dir(tmp_path, [entry(prompt="fine"), "", line, entry(prompt="never read")])
    (tmp_path / "sub").mkdir()
    (tmp_path / "bad.png").write_bytes(b"this is not an image")
    write_image(tmp_path / "big.png", size=(64, 64))
    (tmp_path / "trunc.png").write_bytes((tmp_path / "big.png").read_bytes()[:60])
    msg = data_error(tmp_path)
    assert "prompts.jsonl:3" in msg, msg
    assert expected in msg, msg


def test_non_utf8_line(tmp_path):
    make_dir(tmp_path, [entry()])
    (tmp_path / "prompts.jsonl").write_bytes(entry().encode() + b"\n" + b'{"image": "a.png", "prompt": "\xff"}\n')
    assert "prompts.jsonl:2" in data_error(tmp_path)


# --------------------------------------------------------------------------------------------- split
@pytest.mark.parametrize(
    ("total", "heldout", "sizes"),
    [(0, 0.25, (0, 0)), (1, 0.25, (1, 0)), (2, 0.25, (1, 1)), (3, 0.1, (2, 1)), (4, 0.25, (3, 1)),
     (8, 0.25, (6, 2)), (10, 0.25, (7, 3)), (64, 0.25, (48, 16)), (5, 0.9, (1, 4)), (64, 0.5, (32, 32))],
)
def test_split_sizes(total, heldout, sizes):
    samples = [Sample(image=Image.new("RGB", (1, 1)), prompt=f"q{i}", source=f"t:{i}") for i in range(total)]
    calib, held = split(samples, heldout)
    assert (len(calib), len(held)) == sizes
    assert calib + held == samples  # order kept, the last share held out
    assert split(samples, heldout) == (calib, held)


@pytest.mark.parametrize("heldout", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_share(heldout):
    with pytest.raises(DataError):
        split(builtin_samples(4), heldout)
