"""Pruned Qwen2.5-VL reference chains against Hugging Face with the pruned image tokens masked out as keys."""

import pytest
import torch
from PIL import Image
from transformers import DynamicCache

from btp.compiler import reference_pipeline, stage_layout

PROMPTS = ["What is shown in the image?", "Describe the colours and the shapes of everything you see here."]
STEPS = 16
TOL = 1e-4


def _masked_hf_logits(model, enc, positions, per_layer, image_start, tokens, steps):
    """HF run with 3-row positions (prefill from `get_rope_index`, decode continuing from the last + 1) where each
    layer masks the removed image tokens out as keys (a per-layer 4D mask). Uses only the HF model, the prompt,
    the kept indices and the chain's tokens."""
    hf, n0 = model.hf, int((enc["input_ids"][0] == model.image_token_id).sum())
    b, t = enc["input_ids"].shape
    neg = torch.finfo(torch.float32).min
    mask2d = torch.cat([enc["attention_mask"], torch.ones(b, steps, dtype=torch.int64)], 1)
    state = {"past": 0}

    def hook(module, args, kwargs):
        q_len = (args[0] if args else kwargs["hidden_states"]).shape[1]
        k_len = state["past"] + q_len
        q_pos = torch.arange(q_len) + (k_len - q_len)
        allowed = (torch.arange(k_len)[None, :] <= q_pos[:, None])[None] & (mask2d[:, None, :k_len] > 0)
        keep = per_layer[module.self_attn.layer_idx]
        if keep is not None:
            for row in range(b):
                removed = sorted(set(range(n0)) - set(keep[row]))
                allowed[row, :, [int(image_start[row]) + i for i in removed]] = False
        kwargs["attention_mask"] = torch.where(allowed, 0.0, neg)[:, None]
        return args, kwargs

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in hf.model.language_model.layers]
    try:
        with torch.no_grad():
            cache = DynamicCache(config=hf.config.text_config)
            out = hf(**enc, position_ids=positions, cache=cache, use_cache=True)
            logits, last = [out.logits[:, -1].float()], positions[..., -1]
            for step in range(steps - 1):
                last = last + 1
                state["past"] = t + step
                out = hf(input_ids=tokens[:, step : step + 1], attention_mask=mask2d[:, : t + step + 1],
                         position_ids=last[..., None], cache=cache, use_cache=True)
                logits.append(out.logits[:, -1].float())
    finally:
        for h in handles:
            h.remove()
    return logits


# (preset, batch, image size): the keeps are shares of each image's tokens, 64 (8x8), 32 (4x8) or 24 (6x4).
@pytest.mark.parametrize("preset,batch,size", [("btp", 1, (224, 224)), ("btp", 2, (224, 112)), ("pdrop", 2, (224, 224)),
                                               ("pdrop", 1, (112, 168)), ("fastv", 1, (224, 112)),
                                               ("divprune", 2, (224, 224))])
def test_pruned_chain_equals_masked_hugging_face(tiny_qwen, preset, batch, size):
    images = [Image.linear_gradient("L").resize(size).convert("RGB")] * batch
    pipe = reference_pipeline(tiny_qwen, preset)
    out = pipe.generate(images, PROMPTS[:batch], max_new_tokens=STEPS, output_logits=True)
    inp = pipe.prepare(images, PROMPTS[:batch])
    enc = tiny_qwen.processor(images=images, text=[pipe.prompt_text(p) for p in PROMPTS[:batch]], padding=True,
                              return_tensors="pt")
    positions, _ = tiny_qwen.hf.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"],
                                                     enc["image_grid_thw"], attention_mask=enc["attention_mask"])
    per_layer, p = {}, -1
    for st in stage_layout(pipe.plan):
        p += st.prune is not None
        for layer in st.layers:
            per_layer[layer] = None if p < 0 else [row[p] for row in out.kept_indices]
    tokens = torch.stack([torch.tensor(r + [pipe.spec.pad_token_id] * (STEPS - len(r))) for r in out.token_ids])
    theirs = _masked_hf_logits(tiny_qwen, enc, positions, per_layer, inp.image_start, tokens, len(out.logits))
    for step, (a, b) in enumerate(zip(out.logits, theirs)):
        err = (a - b).abs().max().item()
        assert err <= TOL, f"{preset}, step {step}: max abs logit error {err:.2e}"
    unpruned = reference_pipeline(tiny_qwen, "none").generate(images, PROMPTS[:batch], max_new_tokens=1,
                                                              output_logits=True)
    assert (unpruned.logits[0] - out.logits[0]).abs().max().item() > 10 * TOL  # pruning changed the computation
