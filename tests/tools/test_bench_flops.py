"""btp-bench's FLOPs model: the Qwen2.5-VL vision tower (windowed ViT, patch merger) against a count taken from
Hugging Face's own forward, and the decoder's FLOPs at an image's own token count."""

import math

import pytest
import torch
from PIL import Image
from torch import nn

from btp.compiler import reference_pipeline
from btp.compiler.cost import decoder_flops, qwen_vision_flops, window_lengths
from btp.compiler.presets import resolve_plan
from btp.tools.bench import fixed_flops, image_geometry, layer_tokens_at, plan_flops


def _counted_vision_flops(model, enc) -> float:
    """Multiply-accumulates of Hugging Face's vision tower and merger on `enc`, counted from the shapes its
    modules see: every Linear (rows x in x out), the Conv3d patch embedding (outputs x in x kernel), and each
    attention call's q.k and a.v per sequence of `cu_seqlens` (2 L^2 d)."""
    visual, total, handles = model.hf.model.visual, [0.0], []

    def linear(mod, args, out):
        total[0] += args[0].numel() // mod.in_features * mod.in_features * mod.out_features

    def conv(mod, args, out):
        total[0] += out.numel() * mod.in_channels * math.prod(mod.kernel_size)

    def attention(mod, args, kwargs):
        lengths = (kwargs["cu_seqlens"][1:] - kwargs["cu_seqlens"][:-1]).tolist()
        total[0] += 2.0 * mod.dim * sum(n * n for n in lengths)

    for mod in visual.modules():
        if isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(linear))
        elif isinstance(mod, nn.Conv3d):
            handles.append(mod.register_forward_hook(conv))
        elif type(mod).__name__ == "Qwen2_5_VLVisionAttention":
            handles.append(mod.register_forward_pre_hook(attention, with_kwargs=True))
    try:
        with torch.no_grad():
            visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
    finally:
        for h in handles:
            h.remove()
    return total[0]


@pytest.mark.parametrize("size", [(448, 112), (200, 150), (84, 252), (224, 224)])
def test_qwen_vision_flops_equal_hugging_faces_counted_forward(tiny_qwen, size):
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    enc = tiny_qwen.processor.image_processor(images=[image], return_tensors="pt")
    grid = tuple(enc["image_grid_thw"][0].tolist())
    head = tiny_qwen.hidden_size * tiny_qwen.config.text_config.vocab_size
    counted = _counted_vision_flops(tiny_qwen, enc)
    assert fixed_flops(tiny_qwen, grid) - head == pytest.approx(counted, rel=1e-12)
    if size == (224, 224):  # the nominal square image is the default
        assert fixed_flops(tiny_qwen) == fixed_flops(tiny_qwen, grid)


def test_window_attention_costs_less_than_full_attention_and_windows_cover_the_grid():
    # 4x16 merged tokens in windows of 3 a side: rows 3+1, columns 3*5+1 -> 2 x 6 windows, edge ones partial.
    assert window_lengths(4, 16, 3) == [9, 9, 9, 9, 9, 3, 3, 3, 3, 3, 3, 1]
    assert sum(window_lengths(4, 16, 3)) == 64 and window_lengths(8, 8, 8) == [64]
    sizes = dict(width=32, mlp_width=64, layers=4, patch_pixels=1176, merge=2, window=3, text_width=64)
    grid = (1, 8, 32)
    full, windowed = qwen_vision_flops(grid, full_layers=4, **sizes), qwen_vision_flops(grid, full_layers=2, **sizes)
    # Two blocks move from full attention (one 256-patch sequence) to windows of 36, 12 and 4 patches (4x16
    # merged tokens -> 2 x 6 windows of 9, 3 or 1 merged tokens).
    per_block = 2 * 32 * (256**2 - sum((4 * n) ** 2 for n in window_lengths(4, 16, 3)))
    assert full - windowed == 2 * per_block > 0


def test_plan_flops_at_the_images_token_count(tiny):
    plan = resolve_plan("btp", tiny)
    d, m = tiny.hidden_size, tiny.intermediate_size
    # A fixed-size plan: its own counts, the same FLOPs as Plan.flops.
    assert layer_tokens_at(plan, tiny.image_tokens) == plan.layer_tokens()
    assert plan_flops(plan, tiny.image_tokens, d, m, 7) == pytest.approx(plan.flops(d, m, 7), rel=1e-12)
    assert plan_flops(plan, tiny.image_tokens, d, m, 7) == pytest.approx(
        sum(decoder_flops(k + 7, d, m) for k in plan.layer_tokens()), rel=1e-12)


def test_a_qwen_images_own_token_count_and_grid_drive_the_flops(tiny_qwen):
    pipe = reference_pipeline(tiny_qwen, "btp")
    image = Image.linear_gradient("L").resize((448, 112)).convert("RGB")  # 4x16 merged tokens, 8x32 patches
    n, grid = image_geometry(pipe, [image], ["What is shown?"])
    assert (n, grid) == (64, (1, 8, 32))
    small = Image.linear_gradient("L").resize((140, 140)).convert("RGB")  # 5x5 merged tokens
    assert image_geometry(pipe, [small], ["Hi"]) == (25, (1, 10, 10))
    # btp at 25 tokens: 12, 6, 3 from layers 1, 2, 4 (shares 1/2, 1/4, 1/8, floored).
    assert layer_tokens_at(pipe.plan, 25) == [25, 12, 6, 6, 3, 3, 3, 3]
    d, m = tiny_qwen.hidden_size, tiny_qwen.intermediate_size
    assert plan_flops(pipe.plan, 25, d, m, 10) == sum(decoder_flops(k + 10, d, m) for k in [25, 12, 6, 6, 3, 3, 3, 3])
