"""The reference chain against Hugging Face: equal logits unpruned, equal to per-layer key masking pruned."""

import pytest
import torch
from transformers import DynamicCache

from btp.compiler import reference_pipeline, stage_layout

PROMPTS = ["What is shown in the image?", "Describe the colours and the shapes of everything you see here."]
STEPS = 16
TOL = 1e-4


def _hf_generate(model, inp, steps):
    out = model.hf.generate(
        input_ids=inp.input_ids, attention_mask=inp.attention_mask, pixel_values=inp.pixel_values,
        max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True,
    )
    return out.sequences[:, inp.input_ids.shape[1]:], list(out.logits)


@pytest.mark.parametrize("batch,per_layer", [(1, False), (2, False), (2, True)])
def test_unpruned_chain_equals_hugging_face(tiny, images, batch, per_layer):
    # per_layer: calibration's statistics chain (one stage per layer, every row handed over) is the model too
    pipe = reference_pipeline(tiny, "none", per_layer=per_layer)
    assert len(pipe.spec.stages) == (tiny.num_layers if per_layer else 1)
    out = pipe.generate(images[:batch], PROMPTS[:batch], max_new_tokens=STEPS, output_logits=True)
    inp = pipe.prepare(images[:batch], PROMPTS[:batch])
    if batch == 2:
        assert int(inp.attention_mask.sum(1).min()) < inp.input_ids.shape[1], "prompts must differ in length"
    tokens, logits = _hf_generate(tiny, inp, STEPS)
    assert len(out.logits) == len(logits) == STEPS
    for step, (ours, theirs) in enumerate(zip(out.logits, logits)):
        err = (ours - theirs.float()).abs().max().item()
        assert err <= TOL, f"step {step}: max abs logit error {err:.2e}"
    for row in range(batch):
        assert out.token_ids[row] == tokens[row, : len(out.token_ids[row])].tolist()


def _layer_keep(pipe, plan, kept_row_stage):
    """For every layer, the kept grid indices (None = all) per row."""
    layout = stage_layout(plan)
    per_layer, p = {}, -1
    for st in layout:
        if st.prune is not None:
            p += 1
        for layer in st.layers:
            per_layer[layer] = None if p < 0 else [row[p] for row in kept_row_stage]
    return per_layer


def _masked_hf_logits(model, inp, per_layer, tokens, steps):
    """Hugging Face run where, in each layer, removed image tokens are masked out as keys (a per-layer 4D mask).

    Independent of the chain: it uses only the HF model, the prompt, the kept indices and the chain's tokens.
    The hook reads no keyword of the decoder layer but the mask it replaces (transformers 5.24 renamed the
    cache keyword from `past_key_values` to `cache`): the number of cached positions is this loop's own count.
    """
    hf = model.hf
    b, t = inp.input_ids.shape
    n0 = model.image_tokens
    neg = torch.finfo(torch.float32).min
    layers = hf.model.language_model.layers
    state = {}

    def mask_for(layer, q_len, k_len):
        k_pos = torch.arange(k_len)
        q_pos = torch.arange(q_len) + (k_len - q_len)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None] & (state["mask2d"][:, None, :k_len] > 0)
        keep = per_layer[layer]
        if keep is not None:
            for row in range(b):
                start = int(inp.image_start[row])
                removed = sorted(set(range(n0)) - set(keep[row]))
                allowed[row, :, [start + i for i in removed]] = False
        return torch.where(allowed, 0.0, neg)[:, None]

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        assert "attention_mask" in kwargs, "the decoder layer no longer takes attention_mask as a keyword"
        q_len = hidden.shape[1]
        kwargs["attention_mask"] = mask_for(module.self_attn.layer_idx, q_len, state["past"] + q_len)
        return args, kwargs

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            cache = DynamicCache(config=hf.config.text_config)
            state["mask2d"] = torch.cat([inp.attention_mask, torch.ones(b, steps, dtype=torch.int64)], 1)
            pos = (inp.attention_mask.cumsum(-1) - 1).clamp_min(0)
            state["past"] = 0
            out = hf(input_ids=inp.input_ids, pixel_values=inp.pixel_values, attention_mask=inp.attention_mask,
                     position_ids=pos, past_key_values=cache, use_cache=True)
            logits = [out.logits[:, -1].float()]
            last = pos[:, -1]
            for step in range(steps - 1):
                last = last + 1
                state["past"] = t + step
                out = hf(input_ids=tokens[:, step : step + 1], attention_mask=state["mask2d"][:, : t + step + 1],
                         position_ids=last[:, None], past_key_values=cache, use_cache=True)
                logits.append(out.logits[:, -1].float())
    finally:
        for h in handles:
            h.remove()
    return logits


@pytest.mark.parametrize("preset", ["btp", "pdrop", "fastv", "divprune"])
@pytest.mark.parametrize("batch", [1, 2])
def test_pruned_chain_equals_masked_hugging_face(tiny, images, preset, batch):
    if batch == 2 and preset in ("fastv", "divprune"):
        pytest.skip("batch 2 is covered by btp and pdrop")
    pipe = reference_pipeline(tiny, preset)
    out = pipe.generate(images[:batch], PROMPTS[:batch], max_new_tokens=STEPS, output_logits=True)
    inp = pipe.prepare(images[:batch], PROMPTS[:batch])
    tokens = torch.stack([torch.tensor(r + [pipe.spec.pad_token_id] * (STEPS - len(r))) for r in out.token_ids])
    per_layer = _layer_keep(pipe, pipe.plan, out.kept_indices)
    theirs = _masked_hf_logits(tiny, inp, per_layer, tokens, len(out.logits))
    assert len(theirs) == len(out.logits)
    for step, (a, b) in enumerate(zip(out.logits, theirs)):
        err = (a - b).abs().max().item()
        assert err <= TOL, f"{preset}, step {step}: max abs logit error {err:.2e}"
    # Pruning changes the computation: the masked run differs from the unpruned one.
    unpruned = reference_pipeline(tiny, "none").generate(images[:batch], PROMPTS[:batch], max_new_tokens=1,
                                                         output_logits=True)
    assert (unpruned.logits[0] - out.logits[0]).abs().max().item() > 10 * TOL


@pytest.mark.parametrize("preset", ["none", "btp", "pdrop", "divprune"])
def test_stage_caches_hold_prefix_kept_and_text(tiny, images, preset):
    pipe = reference_pipeline(tiny, preset)
    inp = pipe.prepare(images, PROMPTS)
    pre = pipe.prefill(images, PROMPTS)
    t, n0 = inp.input_ids.shape[1], tiny.image_tokens
    for st in pipe.spec.stages:
        expect = t - n0 + st.image_tokens  # padding + prefix, kept image tokens, text
        cache = pre.caches[st.name]
        assert sorted(cache) == sorted(f"past_key_values.{i}.{k}" for i in st.layers for k in ("key", "value"))
        for name, tensor in cache.items():
            assert tensor.shape == (2, pipe.spec.num_kv_heads, expect, pipe.spec.head_dim), name
    for k, st in zip(pre.kept, pipe.spec.prunes):
        assert k.shape == (2, st.image_tokens)


def test_decode_caches_grow_by_generated_tokens(tiny, images):
    pipe = reference_pipeline(tiny, "btp")
    seen = {}
    engine = pipe.engines["stage4"]
    run = engine.run

    def spy(feeds):
        seen.setdefault("past", []).append(feeds["past_key_values.6.key"].shape[2])
        return run(feeds)

    engine.run = spy
    try:
        out = pipe.generate(images[:1], PROMPTS[:1], max_new_tokens=5)
    finally:
        engine.run = run
    inp = pipe.prepare(images[:1], PROMPTS[:1])
    kept = pipe.spec.stages[-1].image_tokens
    base = inp.input_ids.shape[1] - tiny.image_tokens + kept
    assert seen["past"] == [0] + [base + i for i in range(len(out.token_ids[0]) - 1)]
