"""The backend-independent chain: inputs, sampling, stopping, streaming, threads, and its dependencies."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from btp.compiler import reference_pipeline
from btp.runtime import InputError
from btp.runtime.inputs import to_rgb


@pytest.fixture(scope="module")
def pipe(tiny):
    return reference_pipeline(tiny, "btp")


def test_kept_indices_are_ascending_grid_positions_nested_per_stage(pipe, images):
    out = pipe.generate(images, ["What is shown?", "Describe the image."], max_new_tokens=2)
    for row in out.kept_indices:
        assert [len(k) for k in row] == [s.image_tokens for s in pipe.spec.prunes]
        prev = set(range(pipe.spec.image_tokens))
        for k in row:
            assert k == sorted(k) and set(k) <= prev
            prev = set(k)
    assert out.timings["ttft_ms"] > 0 and out.timings["vision"] > 0


def test_template_is_applied_and_explicit_placeholder_is_kept(pipe, images):
    a = pipe.generate(images[:1], ["What is shown?"], max_new_tokens=2)
    b = pipe.generate(images[:1], ["USER: <image>\nWhat is shown? ASSISTANT:"], max_new_tokens=2)
    assert a.prompt_ids == b.prompt_ids and a.token_ids == b.token_ids


@pytest.mark.parametrize(
    ("images_arg", "prompts", "message"),
    [
        (None, ["<image> <image> two images?"], "exactly one <image>"),
        ("two", ["one prompt"], "one image per prompt"),
        ("text", ["What is shown?"], "cannot preprocess"),
    ],
)
def test_bad_inputs_are_input_errors(pipe, images, images_arg, prompts, message):
    imgs = {None: images[:1], "two": images, "text": ["not an image"]}[images_arg]
    with pytest.raises(InputError, match=message):
        pipe.generate(imgs, prompts, max_new_tokens=1)


@pytest.mark.parametrize(("kwargs", "message"), [({"temperature": 0.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                                  ({"max_new_tokens": 0}, "max_new_tokens")])
def test_bad_sampling_settings(pipe, images, kwargs, message):
    args = {"max_new_tokens": 2, "do_sample": True, **kwargs}
    with pytest.raises(InputError, match=message):
        pipe.generate(images[:1], ["Hi"], **args)


def test_seeded_sampling_is_reproducible_and_seed_dependent(pipe, images):
    run = lambda seed: pipe.generate(images, ["Hi", "Describe."], max_new_tokens=12, do_sample=True,  # noqa: E731
                                     temperature=1.5, seed=seed).token_ids
    assert run(3) == run(3)
    assert run(3) != run(4)
    greedy = pipe.generate(images, ["Hi", "Describe."], max_new_tokens=12).token_ids
    assert run(3) != greedy


def test_top_p_keeps_only_the_nucleus(pipe, images):
    from btp.runtime.sampling import next_tokens

    logits = torch.tensor([[0.0, 5.0, 4.0, -3.0]])
    g = torch.Generator().manual_seed(0)
    drawn = {int(next_tokens(logits, True, 1.0, 0.5, g)) for _ in range(50)}
    assert drawn == {1}


def test_rows_stop_at_eos_independently(pipe, images):
    head = pipe.engines["head"]
    run, calls = head.run, {"n": 0}
    eos = pipe.spec.eos_token_ids[0]

    def forced(feeds):
        out = run(feeds)
        calls["n"] += 1
        if calls["n"] == 3:  # third step: row 0 says EOS
            out["logits"] = out["logits"].clone()
            out["logits"][0, eos] = 1e4
        return out

    head.run = forced
    try:
        out = pipe.generate(images, ["Hi", "Describe."], max_new_tokens=6)
    finally:
        head.run = run
    assert out.token_ids[0][-1] == eos and len(out.token_ids[0]) == 3
    assert len(out.token_ids[1]) == 6


def test_min_new_tokens_holds_eos_back(pipe, images):
    head = pipe.engines["head"]
    run = head.run
    eos = pipe.spec.eos_token_ids[0]

    def always_eos(feeds):
        out = run(feeds)
        out["logits"] = out["logits"].clone()
        out["logits"][:, eos] = 1e4
        return out

    head.run = always_eos
    try:
        free = pipe.generate(images[:1], ["Hi"], max_new_tokens=6)
        held = pipe.generate(images[:1], ["Hi"], max_new_tokens=6, min_new_tokens=4)
    finally:
        head.run = run
    assert free.token_ids[0] == [eos]
    assert len(held.token_ids[0]) == 5 and held.token_ids[0][-1] == eos and eos not in held.token_ids[0][:4]


def test_stream_yields_the_generated_text(pipe, images):
    pieces = list(pipe.stream(images[0], "What is shown?", max_new_tokens=8))
    out = pipe.generate(images[:1], ["What is shown?"], max_new_tokens=8)
    assert "".join(pieces) == out.texts[0]


def test_generate_and_stream_are_one_step_loop_seen_by_the_observer(pipe, images):
    """`steps` is the loop both consume; `on_graph` sees every graph of prefill and of each decode step, with
    the feeds each graph declares and the outputs it made."""
    seen = []

    def observe(name, feeds, outputs):
        assert list(feeds) == pipe.engines[name].input_names
        assert set(outputs) == set(pipe.engines[name].output_names)
        seen.append(name)

    out = pipe.generate(images[:1], ["What is shown?"], max_new_tokens=3, output_logits=True, on_graph=observe)
    n = len(out.token_ids[0])
    prefill = ["vision", "embed"] + [g for s in pipe.spec.stages for g in ([s.prune] if s.prune else []) + [s.name]]
    decode = ["embed"] + [s.name for s in pipe.spec.stages]
    assert seen == prefill + ["head"] + (decode + ["head"]) * (n - 1)
    steps = list(pipe.steps(pipe.prepare(images[:1], ["What is shown?"]), max_new_tokens=3))
    assert [int(s.token[0]) for s in steps] == out.token_ids[0]
    assert all(torch.equal(s.logits, lg) for s, lg in zip(steps, out.logits))
    assert [k[0].tolist() for k in steps[-1].kept] == out.kept_indices[0]
    stream = pipe.stream(images[0], "What is shown?", max_new_tokens=3, on_graph=lambda *a: seen.append(a[0]))
    seen.clear()
    assert "".join(stream) == out.texts[0] and stream.kept_indices == out.kept_indices[0]
    assert seen == prefill + ["head"] + (decode + ["head"]) * (n - 1)


def test_a_huge_prompt_is_refused_before_tokenizing(artifact, monkeypatch):
    """A prompt that cannot fit the artifact's max_prompt tokens, whatever its tokens, is refused from its length:
    the tokenizer never sees it."""
    from btp.runtime import Pipeline

    pipe = Pipeline.load(artifact("btp"))
    assert pipe._max_token_chars and pipe.spec.max_prompt
    huge = "x" * (pipe.spec.max_prompt * pipe._max_token_chars + 1)
    monkeypatch.setattr(pipe, "prompt_text", lambda *a: pytest.fail("the prompt reached the template and tokenizer"))
    with pytest.raises(InputError, match=r"prompt 0 too long: \d+ characters cannot fit in the artifact's 256"):
        pipe.prepare([Image.new("RGB", (32, 32))], [huge])


def test_concurrent_generate_calls_match_sequential(pipe, images, assert_concurrent_calls_match_sequential):
    assert_concurrent_calls_match_sequential(pipe, images)


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("btp.runtime", ("btp.compiler", "btp.graphs", "btp.tools", "btp.toy", "transformers")),  # no model code
        ("btp.graphs", ("btp.compiler", "btp.runtime", "btp.tools", "btp.toy")),
        ("btp.artifact", ("btp.compiler", "btp.graphs", "btp.tools", "btp.toy", "transformers")),
        ("btp.backends", ("btp.compiler", "btp.graphs", "btp.tools", "btp.toy", "btp.artifact", "transformers")),
        # the toy model, its task and trainer: only the error types of the runtime
        ("btp.toy.builtins", ("btp.compiler", "btp.graphs", "btp.tools", "btp.artifact", "btp.backends")),
        ("btp.toy.trainer", ("btp.compiler", "btp.graphs", "btp.tools", "btp.artifact", "btp.backends")),
    ],
)
def test_dependencies_point_one_way(package, forbidden):
    code = (f"import sys, {package}; bad = [m for m in sys.modules if m.startswith({forbidden!r})]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prompt_longer_than_the_positions_is_an_input_error(tiny, images):
    short = reference_pipeline(tiny, "none", max_positions=80)
    with pytest.raises(InputError, match="prompt too long"):
        short.generate(images[:1], ["Describe the colours and the shapes of everything in this image."],
                       max_new_tokens=8)


def test_prompt_ending_with_the_image_is_an_input_error(pipe, images):
    with pytest.raises(InputError, match="expected text after the image placeholder"):
        pipe.generate(images[:1], ["USER: Describe <image>"], max_new_tokens=1)


@pytest.mark.parametrize("bad", [lambda: __import__("numpy").zeros((3, 5)), lambda: torch.zeros(3, 5),
                                 lambda: __import__("PIL.Image").Image.new("RGB", (0, 0))])
def test_unusable_images_give_one_line_input_errors(pipe, bad):
    with pytest.raises(InputError) as err:
        pipe.generate([bad()], ["What is shown?"], max_new_tokens=1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.fromarray(np.full((6, 8), 32768, np.uint16)), 128),  # I;16
        (lambda: Image.new("I;16B", (8, 6), 32768), 128),
        (lambda: Image.fromarray(np.full((6, 8), 65535, np.int32)), 255),  # I holding 16-bit data
        (lambda: Image.fromarray(np.full((6, 8), 0.5, np.float32)), 128),  # F in 0..1
        (lambda: Image.fromarray(np.full((6, 8), 300.0, np.float32)), 255),  # F beyond 0..1: clipped
        (lambda: Image.fromarray(np.full((6, 8), 64.0, np.float32)), 64),
    ],
)
def test_high_bit_depth_gray_is_scaled_not_saturated(make, expected):
    rgb = to_rgb(make())
    assert rgb.mode == "RGB" and rgb.size == (8, 6)
    assert np.asarray(rgb).min() == np.asarray(rgb).max() == expected


def test_32_bit_gray_beyond_16_bits_spans_its_range():
    values = np.array([[-100000, 0, 100000]], np.int32)
    assert np.asarray(to_rgb(Image.fromarray(values)))[0, :, 0].tolist() == [0, 128, 255]


def test_prepare_scales_a_16_bit_png_like_8_bit_mid_gray(pipe, tmp_path):
    Image.fromarray(np.full((40, 48), 32768, np.uint16)).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode in ("I;16", "I")
        deep = pipe.prepare([im], ["What is shown?"]).pixel_values
    gray = pipe.prepare([Image.new("RGB", (48, 40), (128, 128, 128))], ["What is shown?"]).pixel_values
    white = pipe.prepare([Image.new("RGB", (48, 40), (255, 255, 255))], ["What is shown?"]).pixel_values
    assert torch.allclose(deep, gray) and not torch.allclose(deep, white)


@pytest.mark.parametrize(("bad", "found"), [("hi \udcff there", "the byte 0xff at character 3"),
                                            ("\ud800", "the lone surrogate U+D800 at character 0")])
def test_non_utf8_prompt_is_an_input_error_naming_the_prompt(pipe, images, bad, found):
    with pytest.raises(InputError) as err:
        pipe.prepare(images, ["What is shown?", bad])
    assert str(err.value) == f"prompt 1: not valid UTF-8 text: expected UTF-8, found {found}"
