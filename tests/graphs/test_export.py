"""The graph modules trace to static-count graphs: torch.export with dynamic batch/sequence/past dims."""

import torch
from torch.export import Dim, export

from btp.compiler import build_graphs, resolve_plan

BATCH = Dim("batch", min=1, max=8)
SEQ = Dim("seq", min=1, max=512)


def _out_shapes(ep):
    return [str(tuple(o.meta["val"].shape)) for o in list(ep.graph.nodes)[-1].args[0]]


def test_prune_graph_exports_with_plan_constant_shapes(tiny):
    graphs, _ = build_graphs(tiny, resolve_plan("btp", tiny))
    prune = graphs["prune1"]  # 64 -> 32 image tokens
    seq = Dim("seq", min=70, max=512)
    b, t = 2, 80
    args = (torch.randn(b, t, tiny.hidden_size), torch.arange(t)[None].repeat(b, 1),
            torch.ones(b, t, dtype=torch.int64), torch.randn(b, t), torch.tensor([3, 5]))
    dyn = ({0: BATCH, 1: seq}, {0: BATCH, 1: seq}, {0: BATCH, 1: seq}, ({0: BATCH, 1: seq}, {0: BATCH}))
    ep = export(prune, args, dynamic_shapes=dyn)
    shapes = _out_shapes(ep)
    assert all(s.count(" - 32") == 1 for s in shapes[:3]), shapes  # T - 64 + 32
    assert shapes[3].endswith(", 32)"), shapes
    out = ep.module()(*args)
    for a, b_ in zip(out, prune(*args)):
        assert torch.equal(a, b_)


def test_stage_graph_exports_for_prefill_and_decode_shapes(tiny):
    graphs, _ = build_graphs(tiny, resolve_plan("btp", tiny))
    stage = graphs["stage1"]
    past = Dim("past", min=0, max=512)
    b, t, p = 2, 10, 3
    kv = torch.randn(b, stage.num_kv_heads, p, stage.head_dim)
    args = (torch.randn(b, t, tiny.hidden_size), torch.arange(t)[None].repeat(b, 1),
            torch.ones(b, t + p, dtype=torch.int64), kv, kv)
    dyn = ({0: BATCH, 1: SEQ}, {0: BATCH, 1: SEQ}, {0: BATCH, 1: Dim.AUTO}, ({0: BATCH, 2: past}, {0: BATCH, 2: past}))
    ep = export(stage, args, dynamic_shapes=dyn)
    assert len(_out_shapes(ep)) == 1 + 2 * len(stage.layers) + 1  # hidden, presents, scores
    # The same program runs decode shapes (one token, longer past).
    kv1 = torch.randn(1, stage.num_kv_heads, 40, stage.head_dim)
    step = (torch.randn(1, 1, tiny.hidden_size), torch.tensor([[40]]), torch.ones(1, 41, dtype=torch.int64), kv1, kv1)
    for a, b_ in zip(ep.module()(*step), stage(*step)):
        assert torch.allclose(a, b_, atol=1e-6)
