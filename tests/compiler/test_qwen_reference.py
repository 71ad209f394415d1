"""The Qwen2.5-VL reference chain (plan `none`) against Hugging Face: host inputs, vision graph, and logits."""

import pytest
import torch
from PIL import Image
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from btp.compiler import reference_pipeline
from btp.runtime import names as n
from btp.runtime.qwen import vision_feeds

PROMPTS = ["What is shown in the image?", "Describe the colours and the shapes of everything you see here."]
STEPS = 16
TOL = 1e-4


def _image(size):
    return Image.linear_gradient("L").resize(size).convert("RGB")


@pytest.mark.parametrize("grid", [(4, 6), (10, 14), (12, 12), (16, 10)])
def test_vision_feeds_are_hugging_faces(grid):
    h, w = grid  # patches; windows of 3 merged tokens (window_size 84) cut 12 evenly and 4, 6, 10, 14 not
    ours = vision_feeds(h, w, merge=2, window=3)
    thw = torch.tensor([[1, h, w]])
    assert torch.equal(ours[n.VISION_POSITION_IDS], get_vision_position_ids(thw, 2))
    index, cu = get_vision_window_index(thw, spatial_merge_size=2, window_size=84, patch_size=14)
    assert torch.equal(ours[n.WINDOW_INDEX], index)
    assert torch.equal(index[ours[n.WINDOW_INVERSE]], torch.arange(index.numel()))
    theirs = torch.repeat_interleave(torch.arange(cu.numel() - 1), (cu[1:] - cu[:-1]).long())  # window of each patch
    same = lambda ids: ids[:, None] == ids[None, :]  # noqa: E731
    assert torch.equal(same(ours[n.WINDOW_IDS]), same(theirs))


def test_positions_and_image_features_are_hugging_faces(tiny_qwen):
    pipe = reference_pipeline(tiny_qwen, "none")
    images = [_image((200, 150))] * 2
    inp = pipe.prepare(images, PROMPTS)
    enc = tiny_qwen.processor(images=images, text=[pipe.prompt_text(p) for p in PROMPTS], padding=True,
                              return_tensors="pt")
    pos, _ = tiny_qwen.hf.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"],
                                              attention_mask=enc["attention_mask"])
    assert torch.equal(inp.position_ids, pos)
    with torch.no_grad():
        theirs = tiny_qwen.hf.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output
    ours = pipe.engines["vision"].run({n.PIXEL_VALUES: inp.pixel_values, **inp.vision})[n.IMAGE_FEATURES]
    assert ours.shape == (2, 35, tiny_qwen.hidden_size)
    for row in range(2):
        assert (ours[row] - theirs[row]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("batch,mixed", [(1, False), (2, False), (2, True)])
def test_unpruned_chain_equals_hugging_face(tiny_qwen, batch, mixed):
    """`mixed`: two images of different sizes (35 and 4 image tokens) in one Hugging Face batch; the chain runs
    them as two sub-batches, and each row's logits must still be Hugging Face's."""
    pipe = reference_pipeline(tiny_qwen, "none")
    second = _image((60, 40)) if mixed else _image((200, 150))
    images = [_image((60, 40))] if batch == 1 else [_image((200, 150)), second]
    out = pipe.generate(images, PROMPTS[:batch], max_new_tokens=STEPS, output_logits=True)
    enc = tiny_qwen.processor(images=images, text=[pipe.prompt_text(p) for p in PROMPTS[:batch]], padding=True,
                              return_tensors="pt")
    if batch == 2:
        assert int(enc["attention_mask"].sum(1).min()) < enc["input_ids"].shape[1], "prompts must differ in length"
    hf = tiny_qwen.hf.generate(**enc, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    tokens = hf.sequences[:, enc["input_ids"].shape[1]:]
    assert len(out.logits) == len(hf.logits) == STEPS
    for step, (ours, theirs) in enumerate(zip(out.logits, hf.logits)):
        live = ours.isfinite().all(1)  # a sub-batch whose rows all ended has NaN rows
        assert live.any()
        err = (ours[live] - theirs.float()[live]).abs().max().item()
        assert err <= TOL, f"step {step}: max abs logit error {err:.2e}"
    for row in range(batch):
        assert out.token_ids[row] == tokens[row, : len(out.token_ids[row])].tolist()
