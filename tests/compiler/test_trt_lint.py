"""The TensorRT compatibility lint: operator table, project constraints, fp64, opsets and external data."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from btp.compiler.trt_lint import SUPPORTED_OPS, SUPPORTED_OPSETS, Violation, lint_model

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def model(nodes, inputs, outputs, inits=(), opset=18, value_info=(), extra_opsets=()):
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(inits), value_info=list(value_info))
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def vi(name, dtype=F, shape=(2, 8)):
    return helper.make_tensor_value_info(name, dtype, shape)


def k_init(k, name="k"):
    return numpy_helper.from_array(np.array([k], dtype=np.int64), name)


def topk_model(k=3, k_const=True, **attrs):
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=-1, **attrs)
    inputs = [vi("x"), *([] if k_const else [vi("k", I64, (1,))])]
    return model([node], inputs, [vi("v", F, (2, None)), vi("i", I64, (2, None))], [k_init(k)] if k_const else [])


def clean_model():
    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    idx = numpy_helper.from_array(np.array([0, 1], np.int64), "idx")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
        helper.make_node("Softmax", ["h"], ["p"], name="softmax", axis=-1),
        helper.make_node("Gather", ["p", "idx"], ["g"], name="gather", axis=0),
        helper.make_node("TopK", ["g", "k"], ["v", "i"], name="topk", axis=-1),
    ]
    return model(nodes, [vi("x")], [vi("v", F, (2, 3)), vi("i", I64, (2, 3))], [w, idx, k_init(3)])


def only(violations):
    assert len(violations) == 1, [str(v) for v in violations]
    return violations[0]


def test_clean_graph_has_no_violations():
    m = clean_model()
    onnx.checker.check_model(m, full_check=True)
    assert lint_model(m) == []


def test_table_covers_the_ordinary_operators():
    ordinary = {"Add", "MatMul", "Gemm", "Conv", "Reshape", "Transpose", "Concat", "Slice", "Gather", "GatherElements",
                "GatherND", "ScatterND", "ScatterElements", "Expand", "Where", "ReduceMean", "ReduceMax", "Softmax",
                "LayerNormalization", "Cast", "Shape", "Range", "CumSum", "TopK", "ArgMax", "ArgMin", "Loop", "If",
                "Einsum", "Trilu", "IsNaN", "IsInf", "Erf", "Gelu"}
    assert ordinary <= SUPPORTED_OPS
    assert not {"NonZero", "Unique", "SequenceAt", "StringNormalizer"} & SUPPORTED_OPS
    assert list(SUPPORTED_OPSETS) == [17, 18, 19, 20]


def test_torch_export_with_topk_passes():
    class TopTokens(torch.nn.Module):
        def forward(self, x):
            return torch.topk(x.softmax(-1), 3, dim=-1)

    program = torch.onnx.export(TopTokens().eval(), (torch.randn(2, 8),), dynamo=True, opset_version=18, verbose=False)
    m = program.model_proto
    assert "TopK" in {n.op_type for n in m.graph.node}
    assert lint_model(m) == []


def test_nonzero_is_flagged_with_node_name():
    nodes = [helper.make_node("NonZero", ["x"], ["nz"], name="node_NonZero_3")]
    v = only(lint_model(model(nodes, [vi("x")], [vi("nz", I64, (2, None))])))
    assert (v.node, v.op) == ("node_NonZero_3", "NonZero")
    assert "not supported" in v.rule and "output allocator" in v.rule
    assert str(v).startswith("node 'node_NonZero_3' (NonZero): not supported")


@pytest.mark.parametrize("op", ["Unique", "SequenceEmpty", "StringNormalizer", "Attention"])
def test_other_unsupported_ops_are_flagged(op):
    nodes = [helper.make_node(op, ["x"], ["y"], name="n")]
    v = only(lint_model(model(nodes, [vi("x")], [vi("y")])))
    assert (v.node, v.op) == ("n", op) and "not supported by the TensorRT ONNX parser" in v.rule


def test_topk_unsorted_is_flagged():
    v = only(lint_model(topk_model(sorted=0)))
    assert (v.node, v.op) == ("topk", "TopK") and "sorted=1" in v.rule and "sorted=0" in v.rule


def test_topk_large_k_is_flagged():
    assert lint_model(topk_model(k=3840)) == []
    v = only(lint_model(topk_model(k=4000)))
    assert v.op == "TopK" and "3840" in v.rule and "K=4000" in v.rule


def test_topk_runtime_k_is_flagged():
    v = only(lint_model(topk_model(k_const=False)))
    assert v.op == "TopK" and "build-time constant" in v.rule and "'k'" in v.rule


def test_topk_k_from_constant_node_is_checked():
    const = helper.make_node("Constant", [], ["k"], name="kc", value=k_init(5000, "kv"))
    top = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")
    v = only(lint_model(model([const, top], [vi("x")], [vi("v", F, (2, None)), vi("i", I64, (2, None))])))
    assert v.op == "TopK" and "K=5000" in v.rule


def loop_model(scan_output: bool, trip_const: bool = True):
    """Loop summing x over a trip count; optionally also emits a scan output per iteration."""
    body_nodes = [helper.make_node("Add", ["acc_in", "x"], ["acc_out"]), helper.make_node("Identity", ["c"], ["c_out"])]
    body_outputs = [vi("c_out", TensorProto.BOOL, ()), vi("acc_out")]
    if scan_output:
        body_nodes.append(helper.make_node("Identity", ["acc_out"], ["scan"]))
        body_outputs.append(vi("scan"))
    body = helper.make_graph(body_nodes, "body", [vi("it", I64, ()), vi("c", TensorProto.BOOL, ()), vi("acc_in")],
                             body_outputs)
    outs = ["acc", "scans"] if scan_output else ["acc"]
    loop = helper.make_node("Loop", ["n", "cond", "x"], outs, name="loop", body=body)
    inits = [numpy_helper.from_array(np.array(True), "cond")]
    inits += [numpy_helper.from_array(np.array(4, np.int64), "n")] if trip_const else []
    inputs = [vi("x")] + ([] if trip_const else [vi("n", I64, ())])
    return model([loop], inputs, [vi(o, F, None) for o in outs], inits)


def test_loop_without_scan_outputs_passes():
    assert lint_model(loop_model(scan_output=False)) == []


def test_loop_scan_output_is_flagged():
    v = only(lint_model(loop_model(scan_output=True)))
    assert (v.node, v.op) == ("loop", "Loop") and "scan outputs of dynamic length are not allowed" in v.rule


def test_loop_runtime_trip_count_is_flagged():
    v = only(lint_model(loop_model(scan_output=False, trip_const=False)))
    assert v.op == "Loop" and "trip count" in v.rule


def test_subgraph_nodes_are_walked():
    then = helper.make_graph([helper.make_node("NonZero", ["x"], ["t"], name="inner_nz")], "then", [], [vi("t", I64)])
    other = helper.make_graph([helper.make_node("Shape", ["x"], ["e"], name="shape")], "else", [], [vi("e", I64)])
    node = helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)
    m = model([node], [vi("c", TensorProto.BOOL, ()), vi("x")], [vi("y", I64, None)])
    assert [(v.node, v.op) for v in lint_model(m)] == [("inner_nz", "NonZero")]


def test_cumsum_axis_and_range_rank():
    cumsum = helper.make_node("CumSum", ["x", "axis"], ["c"], name="cumsum")
    rng = helper.make_node("Range", ["start", "limit", "delta"], ["r"], name="range")
    inputs = [vi("x"), vi("axis", I64, ()), vi("start", I64, (1,)), vi("limit", I64, ()), vi("delta", I64, ())]
    vs = lint_model(model([cumsum, rng], inputs, [vi("c"), vi("r", I64, (None,))]))
    assert [(v.node, v.op) for v in vs] == [("cumsum", "CumSum"), ("range", "Range")]
    assert "axis" in vs[0].rule and "'start' of rank 1" in vs[1].rule


def test_double_initializer_is_flagged():
    w = numpy_helper.from_array(np.ones((8,), np.float64), "w64")
    nodes = [helper.make_node("Cast", ["w64"], ["w"], to=F), helper.make_node("Add", ["x", "w"], ["y"])]
    v = only(lint_model(model(nodes, [vi("x")], [vi("y")], [w])))
    assert (v.node, v.op) == ("w64", "dtype") and "DOUBLE initializer" in v.rule


def test_double_casts_constants_and_values_are_flagged():
    nodes = [
        helper.make_node("Cast", ["x"], ["x64"], name="to64", to=TensorProto.DOUBLE),
        helper.make_node("Constant", [], ["c64"], name="c64", value=numpy_helper.from_array(np.ones(2), "c")),
        helper.make_node("CastLike", ["x", "c64"], ["y"], name="like64"),
    ]
    vs = lint_model(model(nodes, [vi("x")], [vi("y", TensorProto.DOUBLE)]))
    assert [(v.node, v.op) for v in vs] == [("to64", "dtype"), ("c64", "dtype"), ("like64", "dtype"), ("y", "dtype")]


@pytest.mark.parametrize("opset", [13, 22])
def test_opset_outside_range_is_flagged(opset):
    m = clean_model()
    m.opset_import[0].version = opset
    v = only(lint_model(m))
    assert (v.node, v.op) == ("<model>", "opset") and f"opset {opset}" in v.rule and "17..20" in v.rule
    assert str(v).startswith("<model> (opset):")


def test_custom_domain_node_is_flagged():
    node = helper.make_node("FastGelu", ["x"], ["y"], name="fast_gelu", domain="com.microsoft")
    m = model([node], [vi("x")], [vi("y")], extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    v = only(lint_model(m))
    assert (v.node, v.op) == ("fast_gelu", "FastGelu") and "com.microsoft" in v.rule


def test_violation_is_frozen_and_prints_one_line():
    v = Violation("n", "TopK", "expected sorted=1, found sorted=0")
    assert str(v) == "node 'n' (TopK): expected sorted=1, found sorted=0"
    with pytest.raises(AttributeError):
        v.node = "m"


def test_path_with_external_data_is_linted_without_the_data_file(tmp_path):
    path = tmp_path / "graph.onnx"
    onnx.save_model(clean_model(), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="graph.data", size_threshold=0)
    data = tmp_path / "graph.data"
    assert data.exists()
    data.unlink()
    assert lint_model(path) == []
    assert lint_model(str(path)) == []


def test_external_k_is_checked_when_the_data_file_exists(tmp_path):
    path = tmp_path / "topk.onnx"
    onnx.save_model(topk_model(k=4000), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="topk.data", size_threshold=0)
    assert "K=4000" in only(lint_model(path)).rule
    (tmp_path / "topk.data").unlink()
    assert lint_model(path) == []  # the value is unknown without the data: the lint does not guess


# ------------------------------------------------------------------ the onnx-tensorrt importer rules
B, F16, U8 = TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.UINT8


def counted_loop(cond: str = "", trip: int = 4, body_reads: str = "", ) -> onnx.ModelProto:
    """A Loop over state x; `body_reads` names a body input ("cond_in" or "iter") that the body also consumes."""
    nodes = [helper.make_node("Add", ["x_in", "x_in"], ["x_out"])]
    if body_reads == "cond_in":
        nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    else:
        nodes.append(helper.make_node("Constant", [], ["cond_out"], value=numpy_helper.from_array(np.array(True))))
    if body_reads == "iter":
        nodes.append(helper.make_node("Cast", ["iter"], ["iter_f"], to=F))
        nodes[0] = helper.make_node("Add", ["x_in", "iter_f"], ["x_out"])
    body = helper.make_graph(nodes, "body", [vi("iter", I64, ()), vi("cond_in", B, ()), vi("x_in")],
                             [vi("cond_out", B, ()), vi("x_out")])
    loop = helper.make_node("Loop", ["n", cond, "x"], ["y"], name="loop", body=body)
    inits = [numpy_helper.from_array(np.array(trip, np.int64), "n")]
    if cond:
        inits.append(numpy_helper.from_array(np.array(True), cond))
    return model([loop], [vi("x")], [vi("y")], inits)


def test_loop_body_may_not_read_an_unregistered_condition_input():
    assert lint_model(counted_loop()) == []  # the fill loop's form: empty condition, constant body condition
    v = only(lint_model(counted_loop(body_reads="cond_in")))
    assert v.op == "Loop" and "never registers the body's condition input 'cond_in'" in v.rule
    assert lint_model(counted_loop(cond="c", body_reads="cond_in")) == []  # registered when the outer one is given


def test_loop_trip_count_of_int32_max_counts_as_none():
    assert lint_model(counted_loop(body_reads="iter")) == []
    rules = [v.rule for v in lint_model(counted_loop(trip=2**31 - 1, body_reads="iter"))]
    assert len(rules) == 2 and "below 2^31-1" in rules[0] and "iteration number 'iter'" in rules[1]


def test_loop_trip_count_must_be_one_element():
    m = counted_loop()
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array([4, 4], np.int64), "n"))
    assert "expected the trip count to be a scalar or one element" in only(lint_model(m)).rule


def _one(op, inputs, outputs, inits=(), ins=None, outs=None, **attrs):
    node = helper.make_node(op, ins or [i.name for i in inputs] + [t.name for t in inits],
                            outs or [o.name for o in outputs], name="n", **attrs)
    return model([node], inputs, outputs, inits)


def _axes(values, name="axes"):
    return numpy_helper.from_array(np.array(values, np.int64), name)


IMPORTER_CASES = {
    "topk K of two elements": (
        _one("TopK", [vi("x")], [vi("v", F, None), vi("i", I64, None)], [_axes([3, 3], "k")], axis=-1),
        "expected K to be a scalar or one element"),
    "topk axis outside the rank": (
        _one("TopK", [vi("x")], [vi("v", F, None), vi("i", I64, None)], [k_init(3)], axis=2),
        "expected axis in [-2, 1]"),
    "topk on uint8": (
        _one("TopK", [vi("x", U8)], [vi("v", U8, None), vi("i", I64, None)], [k_init(3)], axis=-1),
        "expected no UINT8 input"),
    "gather on uint8": (_one("Gather", [vi("x", U8), vi("i", I64, (2,))], [vi("y", U8, None)]), "no UINT8"),
    "gather_elements axis": (
        _one("GatherElements", [vi("x"), vi("i", I64)], [vi("y", F, None)], axis=-3), "expected axis in [-2, 1]"),
    "gather_nd symbolic last index dim": (
        _one("GatherND", [vi("x"), vi("i", I64, (2, None))], [vi("y", F, None)], batch_dims=1),
        "static last dimension of the indices 'i'"),
    "range of mixed types": (
        _one("Range", [vi("a", I64, ()), vi("b", TensorProto.INT32, ()), vi("c", I64, ())], [vi("r", I64, None)]),
        "one type, found INT64, INT32, INT64"),
    "range in fp16": (
        _one("Range", [vi("a", F16, ()), vi("b", F16, ()), vi("c", F16, ())], [vi("r", F16, None)]),
        "expected INT32, INT64 or FLOAT inputs, found FLOAT16"),
    "clip with an empty min and no max": (
        _one("Clip", [vi("x")], [vi("y")], ins=["x", ""]), "Clip min value must be an initializer"),
    "clip on bool": (_one("Clip", [vi("x", B)], [vi("y", B)]), "expected no BOOL input"),
    "squeeze without axes on a dynamic shape": (
        _one("Squeeze", [vi("x", F, (1, None))], [vi("y", F, None)]), "expected an axes input"),
    "reduce_l2 with run-time axes": (
        _one("ReduceL2", [vi("x"), vi("axes", I64, (1,))], [vi("y", F, None)]),
        "axes input to be an initializer or Constant"),
    "reduce_l2 on int64": (
        _one("ReduceL2", [vi("x", I64)], [vi("y", I64, None)], [_axes([1])]), "expected no INT64 input"),
    "is_inf on fp16 detecting one sign": (
        _one("IsInf", [vi("x", F16)], [vi("y", B)], detect_negative=0), "expected no FLOAT16 input"),
    "or on floats": (_one("Or", [vi("a"), vi("b")], [vi("y", B)]), "expected BOOL inputs, found 'a' of type FLOAT"),
    "min on bool": (_one("Min", [vi("a", B), vi("b", B)], [vi("y", B)]), "expected no BOOL input"),
    "pow on int64": (_one("Pow", [vi("a", I64), vi("b", I64)], [vi("y", I64)]), "expected no INT64 input"),
    "where on uint8": (_one("Where", [vi("c", B), vi("a", U8), vi("b", U8)], [vi("y", U8)]), "no UINT8"),
    "argmax axis": (_one("ArgMax", [vi("x")], [vi("y", I64, None)], axis=5), "expected axis in [-2, 1]"),
}


@pytest.mark.parametrize("case", IMPORTER_CASES)
def test_importer_rule_flags_its_graph(case):
    m, expected = IMPORTER_CASES[case]
    v = only(lint_model(m))
    assert v.node == "n" and expected in v.rule, str(v)


def test_importer_rules_accept_what_the_btp_graphs_use():
    cases = [
        _one("Clip", [vi("x", I64), vi("lo", I64, ()), vi("hi", I64, ())], [vi("y", I64)]),  # run-time int64 bounds
        _one("Squeeze", [vi("x", I64, (1,))], [vi("y", I64, ())]),  # no axes, static shape
        _one("ReduceL2", [vi("x")], [vi("y", F, None)], [_axes([1])], keepdims=1),
        _one("IsInf", [vi("x")], [vi("y", B)]),
        _one("IsInf", [vi("x")], [vi("y", B)], detect_negative=0),  # one sign: fine on FP32
        _one("Equal", [vi("a", B), vi("b", B)], [vi("y", B)]),  # Equal takes every type
        _one("GatherND", [vi("x"), vi("i", I64, (2, 1))], [vi("y", F, None)], batch_dims=1),
    ]
    assert [lint_model(m) for m in cases] == [[]] * len(cases)


@pytest.mark.parametrize("preset", ["none", "btp", "fastv", "pdrop", "divprune"])
def test_every_exported_graph_passes_the_importer_rules(artifact, preset):
    root = artifact(preset)
    for path in sorted((root / "onnx").glob("*.onnx")):
        assert lint_model(path) == [], path.name


def test_the_old_fill_loop_body_breaks_the_condition_rule(artifact):
    """The diversity fill as it was exported before: the body's condition copied its condition input."""
    m = onnx.load(artifact("btp") / "onnx" / "prune1.onnx")
    assert lint_model(m) == []
    loop = next(n for n in m.graph.node if n.op_type == "Loop")
    assert loop.input[1] == ""
    body = next(a.g for a in loop.attribute if a.name == "body")
    i = next(k for k, n in enumerate(body.node) if n.output[0] == body.output[0].name)
    assert body.node[i].op_type == "Constant"
    body.node[i].CopyFrom(helper.make_node("Identity", [body.input[1].name], [body.output[0].name]))
    v = only(lint_model(m))
    assert v.op == "Loop" and "never registers the body's condition input" in v.rule
