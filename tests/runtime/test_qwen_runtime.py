"""The runtime's own Qwen2.5-VL input preparation and `generate` over sub-batches: images of different sizes in one
call, batches over the artifact's max batch, and images outside the processor's pixel bounds."""

import math

import pytest
import torch
from PIL import Image

from btp.compiler import reference_pipeline
from btp.runtime import ChainSpec, InputError, Pipeline
from btp.runtime import names as n
from btp.runtime.qwen import image_grids

STEPS = 8
PROMPTS = ["What is shown in the image?", "Describe the colours and the shapes of everything you see here.", "Hi",
           "Which colour is at the top?"]


def _image(w, h):
    return Image.linear_gradient("L").resize((w, h)).convert("RGB")


@pytest.fixture(scope="module")
def qwen_none(tiny_qwen):
    return reference_pipeline(tiny_qwen, "none")


def test_chain_spec_names_the_family_and_round_trips(qwen_none, tiny_qwen):
    spec = qwen_none.spec
    v = tiny_qwen.config.vision_config
    assert (spec.family, spec.spatial_merge) == ("qwen2_5_vl", v.spatial_merge_size)
    assert spec.window_tokens == v.window_size // v.spatial_merge_size // v.patch_size
    assert ChainSpec.from_dict(spec.to_dict()) == spec
    old = {k: v for k, v in spec.to_dict().items() if k not in ("family", "spatial_merge", "window_tokens")}
    assert ChainSpec.from_dict(old).family == "llava"  # a manifest written before the fields loads as LLaVA


@pytest.mark.parametrize("size", [(112, 112), (224, 224), (200, 150), (600, 40), (10, 10), (4000, 3000), (57, 29)])
def test_image_grids_need_no_pixels_and_match_the_processor(qwen_none, tiny_qwen, size):
    image = _image(*size)
    _, h, w = tiny_qwen.processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
    expected = (h // 2, w // 2)  # 2x2 patches an image token
    assert image_grids(qwen_none, [image]) == [expected]
    assert image_grids(qwen_none, [torch.zeros(3, size[1], size[0])]) == [expected]  # channels first
    assert image_grids(qwen_none, [torch.zeros(size[1], size[0], 3).numpy()]) == [expected]  # channels last
    assert 4 <= expected[0] * expected[1] <= 64


def test_mixed_sizes_answer_row_by_row_as_alone(qwen_none):
    # 16, 64, 16 and again 64 image tokens, but on another grid: a vision feed of its own, a sub-batch of its own
    images = [_image(112, 112), _image(224, 224), _image(100, 120), _image(448, 112)]
    assert image_grids(qwen_none, images) == [(4, 4), (8, 8), (4, 4), (4, 16)]
    out = qwen_none.generate(images, PROMPTS, max_new_tokens=STEPS, output_logits=True)
    for row, (image, prompt) in enumerate(zip(images, PROMPTS)):
        alone = qwen_none.generate([image], [prompt], max_new_tokens=STEPS, output_logits=True)
        assert out.token_ids[row] == alone.token_ids[0] and out.texts[row] == alone.texts[0]
        assert out.prompt_ids[row] == alone.prompt_ids[0]
        for step, logits in enumerate(out.logits):
            assert logits.shape == (4, alone.logits[0].shape[1])
            if step < len(alone.logits):
                assert (logits[row] - alone.logits[step][0]).abs().max().item() <= 1e-5
            else:  # the row's sub-batch had ended
                assert bool(logits[row].isnan().all())
    assert out.timings["ttft_ms"] > 0 and out.timings["decode_tokens_per_s"] > 0


@pytest.mark.parametrize("preset", ["divprune", "fastv"])
def test_mixed_sizes_keep_indices_in_input_order(tiny_qwen, preset):
    pipe = reference_pipeline(tiny_qwen, preset)
    images = [_image(224, 224), _image(112, 112), _image(224, 224)]  # 64, 16, 64
    out = pipe.generate(images, PROMPTS[:3], max_new_tokens=4)
    for row, (image, prompt) in enumerate(zip(images, PROMPTS)):
        alone = pipe.generate([image], [prompt], max_new_tokens=4)
        assert out.token_ids[row] == alone.token_ids[0]
        assert out.kept_indices[row] == alone.kept_indices[0]
        n0 = math.prod(image_grids(pipe, [image])[0])
        assert all(0 <= i < n0 for kept in out.kept_indices[row] for i in kept)
    assert len(out.kept_indices[1][0]) < len(out.kept_indices[0][0])  # keeps follow each image's own size


def test_images_outside_the_pixel_bounds_are_resized_into_them(qwen_none):
    ip = qwen_none.processor.image_processor
    lo, hi = ip.size["shortest_edge"] // 28**2, ip.size["longest_edge"] // 28**2  # 4 and 64 image tokens
    images = [_image(600, 40), _image(10, 10), _image(4000, 3000)]
    for image in images:
        inp = qwen_none.prepare([image], ["What is shown?"])
        assert lo <= inp.image_tokens <= hi
        assert int((inp.input_ids == qwen_none.spec.image_token_id).sum()) == inp.image_tokens
        assert inp.pixel_values.shape[1] == inp.image_tokens * 4 and inp.position_ids.shape[0] == 3
    out = qwen_none.generate(images, ["What is shown?"] * 3, max_new_tokens=2)
    assert [len(t) for t in out.token_ids] == [2, 2, 2]


def test_bad_input_keeps_its_one_line_errors(qwen_none, tiny_qwen):
    short, ran = reference_pipeline(tiny_qwen, "none", max_positions=80), []  # 16 image tokens fit, 64 do not
    with pytest.raises(InputError, match="prompt too long: .* exceed the 80 positions"):
        short.generate([_image(112, 112), _image(224, 224)], ["Hi", "Hi"], max_new_tokens=8,
                       on_graph=lambda name, *_: ran.append(name))
    assert ran == []  # refused before the sub-batch that fits ran
    with pytest.raises(InputError, match="expected one image per prompt, got 2 images and 1 prompts"):
        qwen_none.generate([_image(112, 112), _image(224, 224)], ["one"], max_new_tokens=1)
    with pytest.raises(InputError, match="aspect ratio of 25:1"):
        qwen_none.generate([_image(1000, 40), _image(112, 112)], ["a", "b"], max_new_tokens=1)
    with pytest.raises(InputError) as err:
        qwen_none.generate([_image(112, 112), torch.zeros(3, 5)], ["a", "b"], max_new_tokens=1)
    assert "\n" not in str(err.value)


def test_prune_graphs_get_the_batchs_image_span(tiny_qwen):
    pipe, seen = reference_pipeline(tiny_qwen, "divprune"), {}
    pipe.prefill([_image(112, 112)] * 2, PROMPTS[:2], on_graph=lambda name, feeds, out: seen.setdefault(name, feeds))
    assert seen[n.VISION][n.PIXEL_VALUES].shape[:2] == (2, 64)  # 16 image tokens of 2x2 patches a row
    assert torch.equal(seen["prune0"][n.IMAGE_SPAN], torch.arange(16))


def test_a_batch_over_max_batch_is_split_and_answers_as_one_by_one(artifact, images):
    pipe = Pipeline.load(artifact("none"))
    assert pipe.spec.max_batch == 4
    prompts = ["What is shown?", "Describe.", "Where is the red circle?", "Hi", "Colours?"]
    pics = [images[i % 2] for i in range(5)]
    out = pipe.generate(pics, prompts, max_new_tokens=6)
    assert len(out.texts) == 5
    for row, (image, prompt) in enumerate(zip(pics, prompts)):
        alone = pipe.generate([image], [prompt], max_new_tokens=6)
        assert (out.token_ids[row], out.texts[row], out.kept_indices[row]) == (alone.token_ids[0], alone.texts[0],
                                                                                alone.kept_indices[0])
    with pytest.raises(InputError, match="exceeds the artifact's max batch 4"):
        pipe.prepare(pics, prompts)  # one prepared batch is still bounded
    assert math.isfinite(out.timings["decode_tokens_per_s"])
