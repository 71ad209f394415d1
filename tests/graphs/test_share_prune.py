"""Prune graphs of a plan of shares: counts computed in the graph from the image span's length, so one exported graph
prunes every image size of its range with static-shape TopK/Loop ops (issue 19)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from btp.compiler.export import export_graph
from btp.compiler.trt_lint import lint_model
from btp.graphs import PruneGraph, Recipe
from btp.graphs.selection import share_count
from btp.runtime.chain import Bounds

HIDDEN, N0 = 16, 64
BOUNDS = Bounds(max_batch=2, max_prompt=96, max_new_tokens=8, min_image_tokens=4, max_image_tokens=N0)
# The released first stage (union of attention picks over all tokens and a from-scratch diversity pick, filled to
# keep) at half the tokens, then an exclusive stage with rebalanced attention picks at an eighth.
RECIPES = {
    "prune1": Recipe(alive=N0, keep=32, attention=6, rho=1.5, rebalance=True, released=True, union=True, share=0.5),
    "prune2": Recipe(alive=32, keep=8, attention=4, rho=1.25, rebalance=True, share=0.125, alive_share=0.5),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("share-prune")
    out = {}
    for name, recipe in RECIPES.items():
        module = PruneGraph(name, recipe, HIDDEN, torch.float32, image_tokens=N0, position_rows=3).eval()
        path = root / f"{name}.onnx"
        export_graph(module, path, limits=BOUNDS, opset=18, image_token_id=5, image_tokens=N0, alive=recipe.alive)
        out[name] = (module, path)
    return out


def _feeds(module: PruneGraph, n0: int, batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    alive = module.recipe.at(n0).alive
    t = alive + 9
    feeds = {"hidden_states": torch.randn(batch, t, HIDDEN, generator=g),
             "position_ids": torch.randint(0, 50, (3, batch, t), generator=g),
             "attention_mask": torch.ones(batch, t, dtype=torch.int64), "scores": torch.rand(batch, t, generator=g),
             "image_start": torch.tensor([3, 5][:batch]), "image_span": torch.arange(n0)}
    return {k: feeds[k] for k in module.spec().input_names}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_one_graph_prunes_every_image_size_as_torch_does(exported, name):
    module, path = exported[name]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n0 in (4, 6, 16, 24, 35, 64):  # 6 and 35: the shares round down; 4: the first stage has no attention picks
        counts = module.recipe.at(n0)
        for batch in (1, 2):
            feeds = _feeds(module, n0, batch, seed=n0 * 10 + batch)
            with torch.no_grad():
                want = module(*feeds.values())
            got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
            assert got[3].shape == (batch, counts.keep) == (batch, share_count(n0, module.recipe.share))
            assert got[3].tolist() == want[3].tolist(), (name, n0, batch)
            for a, b in zip(got[:3], want[:3]):
                assert a.shape == tuple(b.shape) and np.array_equal(a, b.numpy()), (name, n0, batch)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_counts_are_shape_expressions_with_topk_and_no_nonzero(exported, name):
    module, path = exported[name]
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert "TopK" in ops and "Loop" in ops and "NonZero" not in ops
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    keep = f"image_tokens * {round(module.recipe.share * 10_000)} // 10000"
    assert dims["keep_indices"] == ["batch", keep]
    assert all("seq" in str(d[-2 if k == "pruned_hidden_states" else -1]) and "image_tokens" in
               str(d[-2 if k == "pruned_hidden_states" else -1]) for k, d in dims.items() if k != "keep_indices")
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert inputs["image_span"] == ["image_tokens"] and inputs["position_ids"] == [3, "batch", "seq"]
    assert lint_model(path) == []


def _topk_on(k_nodes, k_inputs=()):
    """TopK over `x [2,8]` with K produced by `k_nodes` (reading `x` and `k_inputs`)."""
    top = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=-1)
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    graph = helper.make_graph([*k_nodes, top], "g", [helper.make_tensor_value_info("x", f, (2, "n")), *k_inputs],
                              [helper.make_tensor_value_info("v", f, (2, None)),
                               helper.make_tensor_value_info("i", i64, (2, None))],
                              [numpy_helper.from_array(np.array([1], np.int64), "one"),
                               numpy_helper.from_array(np.array([2], np.int64), "two")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_lint_accepts_a_k_from_input_dims_and_rejects_one_from_values():
    from_dims = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "one"], ["n"]),
                 helper.make_node("Div", ["n", "two"], ["k"])]
    assert lint_model(_topk_on(from_dims)) == []
    from_values = [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
                   helper.make_node("Cast", ["m"], ["m64"], to=TensorProto.INT64),
                   helper.make_node("Reshape", ["m64", "one"], ["k"])]
    (v,) = lint_model(_topk_on(from_values))
    assert v.op == "TopK" and "depends on tensor values" in v.rule and "'k'" in v.rule
