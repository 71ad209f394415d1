"""Each graph module against the Hugging Face computation it replaces, and its declared I/O."""

import torch

from btp.compiler import build_graphs, resolve_plan
from btp.graphs.layers import additive_mask


def test_vision_graph_equals_hugging_face_image_features(tiny, images):
    graphs, _ = build_graphs(tiny, resolve_plan("none", tiny))
    pixels = tiny.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = graphs["vision"](pixels)
        feats = tiny.hf.model.get_image_features(pixel_values=pixels)
        # transformers 5 returns an output whose pooler_output holds the per-image features; 4.x the features
        feats = getattr(feats, "pooler_output", feats)
        theirs = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    assert ours.shape == (2, tiny.image_tokens, tiny.hidden_size)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_embed_graph_fills_image_positions_in_order(tiny):
    graphs, spec = build_graphs(tiny, resolve_plan("none", tiny))
    embed = graphs["embed"]
    n, d = 3, tiny.hidden_size
    img = spec.image_token_id
    ids = torch.tensor([[5, img, img, img, 7, 8], [4, 5, 6, img, img, img]])
    feats = torch.randn(2, n, d)
    with torch.no_grad():
        out = embed(ids, feats)
        table = tiny.hf.get_input_embeddings().weight
    assert torch.equal(out[0, 1:4], feats[0]) and torch.equal(out[1, 3:6], feats[1])
    assert torch.equal(out[0, 0], table[5]) and torch.equal(out[1, 2], table[6])
    # Decode: no image features at all.
    step = embed(torch.tensor([[9], [10]]), torch.zeros(2, 0, d))
    assert torch.equal(step[:, 0], table[[9, 10]])


def test_stage_specs_name_every_layer_and_only_scoring_stages_emit_scores(tiny):
    plan = resolve_plan("btp", tiny)
    graphs, spec = build_graphs(tiny, plan)
    for j, st in enumerate(spec.stages):
        g = graphs[st.name].spec()
        assert g.input_names[:3] == ["inputs_embeds", "position_ids", "attention_mask"]
        assert g.input_names[3:] == [f"past_key_values.{i}.{k}" for i in st.layers for k in ("key", "value")]
        assert g.output_names[1:1 + 2 * len(st.layers)] == [f"present.{i}.{k}" for i in st.layers
                                                               for k in ("key", "value")]
        nxt = spec.stages[j + 1] if j + 1 < len(spec.stages) else None
        scoring = nxt is not None and graphs[nxt.prune].uses_scores
        assert ("scores" in g.output_names) == scoring


def test_scores_are_head_mean_logits_of_the_last_query(tiny, images):
    plan = resolve_plan("btp", tiny)
    graphs, _ = build_graphs(tiny, plan)
    stage = graphs["stage0"]  # layer 0, followed by prune1 with attention picks
    torch.manual_seed(0)
    b, t, d = 1, 10, tiny.hidden_size
    x = torch.randn(b, t, d)
    pos = torch.arange(t)[None]
    mask = torch.ones(b, t, dtype=torch.int64)
    past = [torch.zeros(b, stage.num_kv_heads, 0, stage.head_dim)] * 2
    with torch.no_grad():
        out = stage(x, pos, mask, *past)
        layer = tiny.hf.model.language_model.layers[0]
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, t, -1, stage.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, t, -1, stage.head_dim).transpose(1, 2)
        cos, sin = tiny.hf.model.language_model.rotary_emb(h, pos)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, attn.num_key_value_groups)
        expect = (q[:, :, -1:] @ k.transpose(2, 3))[:, :, 0] * attn.scaling  # [B,H,S]
    assert (out[-1] - expect.mean(1)).abs().max().item() <= 1e-5


def test_additive_mask_is_causal_over_past_and_hides_padding():
    m = additive_mask(torch.tensor([[0, 1, 1, 1, 1]]), seq=2)  # past 3 (first is padding), 2 new
    allowed = (m[0, 0, 0] == 0).tolist()
    assert allowed == [[False, True, True, True, False], [False, True, True, True, True]]


def test_final_stage_computes_only_the_row_the_head_reads(tiny):
    """The model's last stage returns `[B,1,D]`: the last row of the full computation, with the same caches."""
    from btp.graphs import StageGraph

    graphs, spec = build_graphs(tiny, resolve_plan("none", tiny))
    final = graphs["stage0"]
    assert final.final and final.spec().outputs[0].shape[1] == 1
    full = StageGraph("full", list(final.layers), 0, final.rotary, final.num_kv_heads, final.head_dim,
                      final.hidden_size, final.dtype)
    torch.manual_seed(0)
    b, t = 2, 9
    x = torch.randn(b, t, tiny.hidden_size)
    pos = torch.arange(t)[None].expand(b, -1)
    mask = torch.ones(b, t, dtype=torch.int64)
    mask[1, :3] = 0  # a left-padded row
    past = [torch.zeros(b, final.num_kv_heads, 0, final.head_dim)] * (2 * len(final.layers))
    with torch.no_grad():
        ours, theirs = final(x, pos, mask, *past), full(x, pos, mask, *past)
    assert ours[0].shape == (b, 1, tiny.hidden_size)
    assert (ours[0] - theirs[0][:, -1:]).abs().max().item() <= 1e-6
    for a, c in zip(ours[1:], theirs[1:]):
        assert torch.equal(a, c)
