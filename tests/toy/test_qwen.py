"""builtin:tiny-qwen2.5-vl: a real Qwen2.5-VL model and processor, loadable from disk, generating with HF."""

import torch
from PIL import Image

from btp.compiler import load_model
from btp.compiler.qwen2_5_vl import Qwen25VLFamily
from btp.toy.qwen import save_processor

SIZES = [(60, 40), (200, 150)]


def _inputs(model, size, prompt="What is shown in the image?"):
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = model.processor.apply_chat_template(messages, add_generation_prompt=True)
    return model.processor(images=[image], text=[text], return_tensors="pt")


def test_builtin_is_a_qwen2_5_vl_with_windowed_and_full_vit_blocks_and_mrope(tiny_qwen):
    cfg = tiny_qwen.config
    assert isinstance(tiny_qwen.family, Qwen25VLFamily) and tiny_qwen.family.name == "qwen2_5_vl"
    assert type(tiny_qwen.hf).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(tiny_qwen.processor).__name__ == "Qwen2_5_VLProcessor"
    assert 0 < len(cfg.vision_config.fullatt_block_indexes) < cfg.vision_config.depth
    assert cfg.text_config.num_key_value_heads < cfg.text_config.num_attention_heads
    assert cfg.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert tiny_qwen.image_tokens == 64 and tiny_qwen.grid == (8, 8)  # the largest square image
    tok = tiny_qwen.processor.tokenizer
    for special in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"):
        assert special in tok.get_vocab(), special


def test_two_image_sizes_give_two_image_token_counts(tiny_qwen):
    counts = []
    for size in SIZES:
        enc = _inputs(tiny_qwen, size)
        n = int((enc["input_ids"] == tiny_qwen.image_token_id).sum())
        t, h, w = enc["image_grid_thw"][0].tolist()
        assert n == t * h * w // 4 and 4 <= n <= 64
        counts.append(n)
    assert counts[0] != counts[1], counts


def test_saved_checkpoint_loads_back_and_generates_the_same_tokens(tiny_qwen, tmp_path):
    tiny_qwen.hf.save_pretrained(tmp_path)
    save_processor(tiny_qwen.processor, tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.family.name == "qwen2_5_vl" and loaded.fingerprint == tiny_qwen.fingerprint
    for size in SIZES:
        enc = _inputs(loaded, size)
        assert torch.equal(enc["input_ids"], _inputs(tiny_qwen, size)["input_ids"])
        with torch.no_grad():
            ours = loaded.hf.generate(**enc, max_new_tokens=4, do_sample=False)
            theirs = tiny_qwen.hf.generate(**enc, max_new_tokens=4, do_sample=False)
        assert ours.shape[1] == enc["input_ids"].shape[1] + 4
        assert torch.equal(ours, theirs)
