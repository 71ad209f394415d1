"""The greedy max-min fills (`btp::farthest_point_fill`, `btp::fill_to`) as ONNX Loops with a counted trip count.

The dynamo exporter cannot turn a Python for-loop into a Loop, and unrolled picks cost a Shape/Expand/
Gather chain each. So each op is exported as one placeholder node, `btp.FarthestPointFill` or `btp.FillTo`, which
`expand_fill_loops` replaces by a counted Loop. The trip count is a constant (the `picks` attribute), or, in the
graphs of a plan of shares, a scalar input computed from the input shapes (the picks follow the image's token
count); `FillTo` picks only in rows still short of its `keep` input. State (chosen, mind), no scan outputs, no
condition (a plain
counted loop for the TensorRT parser; the body does not read its condition input, which that parser leaves
unregistered when the outer condition is empty), the picked row read with GatherND(batch_dims=1). Measured on ONNX
Runtime CPU at llava-bench sizes (N=576, 58 picks): 0.74 ms against 1.25 ms unrolled, 15 nodes against 702.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DOMAIN = "btp"
OP = "FarthestPointFill"
FILL_TO = "FillTo"


def _register_schemas() -> None:
    """The placeholders need schemas for the exporter's op builder; they never reach a saved graph."""
    param, optional = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.FormalParameterOption.Optional
    count = "tensor(int64)"
    out = [param("chosen_out", "tensor(bool)")]
    if not onnx.defs.has(OP, DOMAIN):
        onnx.defs.register_schema(onnx.defs.OpSchema(
            OP, DOMAIN, 1,
            inputs=[param("dist", "tensor(float)"), param("chosen", "tensor(bool)"),
                    param("trips", count, param_option=optional)],
            outputs=out,
            attributes=[onnx.defs.OpSchema.Attribute("picks", onnx.defs.OpSchema.AttrType.INT, "greedy picks",
                                                     required=False)],
        ))
    if not onnx.defs.has(FILL_TO, DOMAIN):
        onnx.defs.register_schema(onnx.defs.OpSchema(
            FILL_TO, DOMAIN, 1,
            inputs=[param("dist", "tensor(float)"), param("chosen", "tensor(bool)"), param("keep", count),
                    param("trips", count)],
            outputs=out,
        ))


def fill_translation():
    """The exporter's translation of `torch.ops.btp.farthest_point_fill` into the placeholder node: `picks` a
    constant attribute, or the scalar it is computed into from the input shapes."""
    from onnxscript import values

    _register_schemas()
    btp = values.Opset(DOMAIN, 1)

    def farthest_point_fill(dist, chosen, picks):
        if isinstance(picks, int):
            return btp.FarthestPointFill(dist, chosen, picks=picks)
        return btp.FarthestPointFill(dist, chosen, picks)

    return farthest_point_fill


def fill_to_translation():
    """The exporter's translation of `torch.ops.btp.fill_to` (only exported with counts computed from shapes)."""
    from onnxscript import values

    _register_schemas()
    btp = values.Opset(DOMAIN, 1)

    def fill_to(dist, chosen, keep, trips):
        return btp.FillTo(dist, chosen, keep, trips)

    return fill_to


def _loop_nodes(node: onnx.NodeProto, prefix: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes and constants that compute `node` (a FarthestPointFill or a FillTo) with a Loop."""
    dist, chosen = node.input[:2]
    counted = [i for i in node.input[2:] if i]  # FillTo: keep, trips; FarthestPointFill: trips, when computed
    keep = counted[0] if node.op_type == FILL_TO else None
    (out,) = node.output
    n = lambda name: f"{prefix}{name}"  # noqa: E731 - short local namer
    consts = [numpy_helper.from_array(np.array([], np.int64), n("scalar"))]
    if counted:
        trips = [helper.make_node("Reshape", [counted[-1], n("scalar")], [n("trip_count")])]  # a 0-D trip count
    else:
        picks = next(a.i for a in node.attribute if a.name == "picks")
        consts.append(numpy_helper.from_array(np.array(picks, np.int64), n("trip_count")))
        trips = []
    consts += [
        numpy_helper.from_array(np.array(4.0, np.float32), n("far")),
        numpy_helper.from_array(np.array(-1.0, np.float32), n("taken")),
        numpy_helper.from_array(np.array(0, np.int64), n("zero")),
        numpy_helper.from_array(np.array(1, np.int64), n("one")),
        numpy_helper.from_array(np.array([0], np.int64), n("axis0")),
        numpy_helper.from_array(np.array([1], np.int64), n("axis1")),
        numpy_helper.from_array(np.array([2], np.int64), n("axis2")),
    ]
    outer = [
        *trips,
        helper.make_node("Shape", [dist], [n("shape")]),
        helper.make_node("Gather", [n("shape"), n("one")], [n("count")], axis=0),
        helper.make_node("Range", [n("zero"), n("count"), n("one")], [n("range")]),
        helper.make_node("Unsqueeze", [n("range"), n("axis0")], [n("positions")]),  # [1,N]
        helper.make_node("Unsqueeze", [chosen, n("axis2")], [n("chosen_rows")]),  # [B,N,1]
        helper.make_node("Where", [n("chosen_rows"), dist, n("far")], [n("chosen_dist")]),
        helper.make_node("ReduceMin", [n("chosen_dist"), n("axis1")], [n("mind")], keepdims=0),  # [B,N]
    ]
    if keep is None:
        choose = [helper.make_node("Equal", [n("positions"), n("pick")], [n("hit")])]
    else:  # only rows still short of `keep` pick
        choose = [
            helper.make_node("Equal", [n("positions"), n("pick")], [n("at_pick")]),
            helper.make_node("Cast", [n("c_in")], [n("c_int")], to=TensorProto.INT64),
            helper.make_node("ReduceSum", [n("c_int"), n("axis1")], [n("held")], keepdims=1),  # [B,1]
            helper.make_node("Less", [n("held"), keep], [n("short")]),
            helper.make_node("And", [n("at_pick"), n("short")], [n("hit")]),
        ]
    body = helper.make_graph(
        [
            helper.make_node("Where", [n("c_in"), n("taken"), n("m_in")], [n("masked")]),
            helper.make_node("ArgMax", [n("masked")], [n("pick")], axis=1, keepdims=1),  # [B,1], first max
            *choose,
            helper.make_node("Or", [n("c_in"), n("hit")], [n("c_out")]),
            helper.make_node("GatherND", [dist, n("pick")], [n("row")], batch_dims=1),  # [B,N]
            helper.make_node("Min", [n("m_in"), n("row")], [n("m_out")]),
            # The outer condition is empty, so the TensorRT parser never registers `cond_in` (onnx-tensorrt's Loop
            # importer, 10.x): a body node reading it fails to parse. The body's condition is a constant instead.
            helper.make_node("Constant", [], [n("cond_out")], value=numpy_helper.from_array(np.array(True), "true")),
        ],
        f"{prefix}body",
        [
            helper.make_tensor_value_info(n("iter"), TensorProto.INT64, []),
            helper.make_tensor_value_info(n("cond_in"), TensorProto.BOOL, []),
            helper.make_tensor_value_info(n("c_in"), TensorProto.BOOL, None),
            helper.make_tensor_value_info(n("m_in"), TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info(n("cond_out"), TensorProto.BOOL, []),
            helper.make_tensor_value_info(n("c_out"), TensorProto.BOOL, None),
            helper.make_tensor_value_info(n("m_out"), TensorProto.FLOAT, None),
        ],
    )
    loop = helper.make_node("Loop", [n("trip_count"), "", chosen, n("mind")], [out, n("mind_final")],
                            name=f"{prefix}loop", body=body)
    return [*outer, loop], consts


def expand_fill_loops(model: onnx.ModelProto) -> int:
    """Replace every `btp.FarthestPointFill` and `btp.FillTo` node of `model` (in place) by its Loop; returns how
    many."""
    graph = model.graph
    nodes, count = [], 0
    for node in graph.node:
        if node.domain == DOMAIN and node.op_type in (OP, FILL_TO):
            new, consts = _loop_nodes(node, f"fill{count}/")
            nodes += new
            graph.initializer.extend(consts)
            count += 1
        else:
            nodes.append(node)
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
        keep = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep)
    return count
