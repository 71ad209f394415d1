"""TensorRT compatibility lint for exported ONNX graphs.

``btp-compile`` runs :func:`lint_model` on every graph it exports before it declares success, because TensorRT
itself cannot be installed everywhere the compiler runs. The lint is a static restatement of what the TensorRT 10
ONNX parser accepts (TensorRT 11 keeps the same set for the operators these graphs use).

Where the table comes from: ``SUPPORTED_OPS`` is the "Y" column of the operator support matrix that onnx-tensorrt
publishes for TensorRT 10 (``docs/operators.md`` on its 10.x branches, which parse opset 9 to 20), rewritten here as
a frozenset. Anything missing from it (Sequence*, String*, Unique, the windowing/DFT ops, ...) is rejected, as is
any node outside the default ONNX domain: the stock parser has no importer for custom domains without plugins.

Why the extra rules matter for btp:
* opset 17..20: 17 is the first opset with LayerNormalization, 20 is the newest the TensorRT 10 parser reads.
* The runtime builds engines with static shapes and binds fixed buffers; it never installs an output allocator.
  So NonZero / NonMaxSuppression (output size depends on data) are rejected even where the parser could import them.
* TopK: ITopKLayer only returns sorted results and caps K at 3840; K must also be a build-time constant so the
  number of kept tokens, and every shape after pruning, is known when the engine is built.
* Loop: scan outputs of dynamic length are rejected by the parser, and a run-time trip count makes shapes dynamic.
* CumSum's axis must be an initializer and Range's start/limit/delta must be 0-d tensors for the parser.
* No fp64: TensorRT has no double kernels and silently casts DOUBLE down to FLOAT (clamping), which would make the
  engine disagree with the PyTorch reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

__all__ = ["MAX_TOPK_K", "SUPPORTED_OPS", "SUPPORTED_OPSETS", "Violation", "lint_model"]

SUPPORTED_OPSETS = range(17, 21)
MAX_TOPK_K = 3840
DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})

# Operators the TensorRT 10 ONNX parser imports (support matrix "Y" rows), less the data-dependent ones btp rejects.
_SUPPORTED_OPS_TEXT = """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu
    Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear
    Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
    GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid
    HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
    LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization
    Min Mish Mod Mul Neg Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike
    RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
    ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax
    Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu
    Unsqueeze Upsample Where Xor
"""
SUPPORTED_OPS: frozenset[str] = frozenset(_SUPPORTED_OPS_TEXT.split())

_PARSER = "not supported by the TensorRT ONNX parser"
_DYNAMIC = "not supported for btp engines: the output shape depends on the data and needs an output allocator"
_SEQUENCE = f"{_PARSER} (sequence types cannot be imported)"
_SEQUENCE_OPS = "SequenceConstruct SequenceAt SequenceInsert SequenceEmpty SequenceErase SequenceLength SequenceMap"
UNSUPPORTED_REASONS: dict[str, str] = {
    "NonZero": _DYNAMIC,
    "NonMaxSuppression": _DYNAMIC,
    "Unique": f"{_PARSER} (and its output shape depends on the data)",
    "StringNormalizer": f"{_PARSER} (string tensors cannot be imported)",
    **dict.fromkeys([*_SEQUENCE_OPS.split(), "SplitToSequence", "ConcatFromSequence"], _SEQUENCE),
}
assert not SUPPORTED_OPS & UNSUPPORTED_REASONS.keys()


@dataclass(frozen=True)
class Violation:
    """One TensorRT incompatibility: where (node or value name), which op (or "opset"/"dtype"), and why."""

    node: str
    op: str
    rule: str

    def __str__(self) -> str:
        if self.node.startswith("<"):
            return f"{self.node} ({self.op}): {self.rule}"
        if self.op in ("opset", "dtype"):  # node or value name; the rule says which
            return f"'{self.node}' ({self.op}): {self.rule}"
        return f"node '{self.node}' ({self.op}): {self.rule}"


def lint_model(model: onnx.ModelProto | str | os.PathLike) -> list[Violation]:
    """TensorRT violations of ``model`` (ModelProto or path; external weights are not needed), in graph order."""
    base_dir = None
    if not isinstance(model, onnx.ModelProto):
        base_dir = Path(model).parent
        model = onnx.load(os.fspath(model), load_external_data=False)
    linter = _Linter(model, base_dir)
    linter.check_opset(model)
    linter.check_graph(model.graph, {})
    return linter.out


class _Linter:
    def __init__(self, model: onnx.ModelProto, base_dir: Path | None):
        self.out: list[Violation] = []
        self.base_dir = base_dir
        self.types: dict[str, tuple[int, int | None]] = {}  # value name -> (elem_type, rank or None)
        try:  # inferred types only feed the lookups (Range ranks, CastLike targets); violations come from `model`
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # too large or malformed for inference: use only what the graph declares
            inferred = model
        self._collect_types(inferred.graph)

    def _collect_types(self, graph: onnx.GraphProto) -> None:
        for vi in [*graph.input, *graph.output, *graph.value_info]:
            tt = vi.type.tensor_type
            if vi.type.HasField("tensor_type"):
                self.types[vi.name] = (tt.elem_type, len(tt.shape.dim) if tt.HasField("shape") else None)
        for t in graph.initializer:
            self.types[t.name] = (t.data_type, len(t.dims))
        for node in graph.node:
            for g in _subgraphs(node):
                self._collect_types(g)

    def flag(self, node: str, op: str, rule: str) -> None:
        self.out.append(Violation(node, op, rule))

    def check_opset(self, model: onnx.ModelProto) -> None:
        versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
        lo, hi = SUPPORTED_OPSETS[0], SUPPORTED_OPSETS[-1]
        if not versions:
            self.flag("<model>", "opset", f"expected a default-domain opset in {lo}..{hi}, found none")
        for v in versions:
            if v not in SUPPORTED_OPSETS:
                self.flag("<model>", "opset", f"expected default-domain opset {lo}..{hi}, found opset {v}")

    def check_graph(self, graph: onnx.GraphProto, outer: dict[str, TensorProto]) -> None:
        consts = dict(outer)  # build-time constants visible here: initializers and Constant outputs, outer scopes too
        self._check_values(graph.input, "graph input")
        for t in graph.initializer:
            consts[t.name] = t
            if t.data_type == TensorProto.DOUBLE:
                self.flag(t.name, "dtype", "expected no fp64 tensors, found a DOUBLE initializer")
        for node in graph.node:
            self.check_node(node, consts)
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and node.output:
                consts[node.output[0]] = _constant_tensor(node)
        self._check_values(graph.value_info, "value_info entry")
        self._check_values(graph.output, "graph output")

    def _check_values(self, values, what: str) -> None:
        for vi in values:
            if vi.type.tensor_type.elem_type == TensorProto.DOUBLE:
                self.flag(vi.name, "dtype", f"expected no fp64 tensors, found a DOUBLE {what}")

    def check_node(self, node: onnx.NodeProto, consts: dict[str, TensorProto]) -> None:
        name = node.name or (node.output[0] if node.output else f"<unnamed {node.op_type}>")
        op = node.op_type
        if node.domain not in DEFAULT_DOMAINS:
            self.flag(name, op, f"{_PARSER}: custom domain '{node.domain}' needs a TensorRT plugin")
        elif op in UNSUPPORTED_REASONS or op not in SUPPORTED_OPS:
            self.flag(name, op, UNSUPPORTED_REASONS.get(op, _PARSER))
        else:
            self._check_constraints(name, node, consts)
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR and attr.t.data_type == TensorProto.DOUBLE:
                self.flag(name, "dtype", f"expected no fp64 tensors, found a DOUBLE tensor in attribute '{attr.name}'")
        for g in _subgraphs(node):
            self.check_graph(g, consts)

    def _check_constraints(self, name: str, node: onnx.NodeProto, consts: dict[str, TensorProto]) -> None:
        op, ins, attrs = node.op_type, list(node.input), {a.name: a for a in node.attribute}
        if op == "TopK":
            if "sorted" in attrs and attrs["sorted"].i != 1:
                self.flag(name, op, f"expected sorted=1, found sorted={attrs['sorted'].i}")
            k = ins[1] if len(ins) > 1 else ""
            if k not in consts:
                self.flag(name, op, f"expected K to be a build-time constant, found run-time value '{k}'")
            elif (value := self._small_value(consts[k])) is not None and int(value.reshape(-1)[0]) > MAX_TOPK_K:
                self.flag(name, op, f"expected K <= {MAX_TOPK_K}, found K={int(value.reshape(-1)[0])}")
        elif op == "Loop":
            carried = len(ins) - 2
            if len(node.output) > carried:
                n = len(node.output) - carried
                self.flag(name, op, f"scan outputs of dynamic length are not allowed, found {n} scan output(s)")
            if not ins or not ins[0]:
                self.flag(name, op, "expected a constant trip count M, found none (a condition-only loop)")
            elif ins[0] not in consts:
                self.flag(name, op, f"expected a constant trip count M, found run-time value '{ins[0]}'")
        elif op == "CumSum" and len(ins) > 1 and ins[1] not in consts:
            self.flag(name, op, f"expected the axis input to be a build-time constant, found '{ins[1]}'")
        elif op == "Range":
            for label, x in zip(("start", "limit", "delta"), ins):
                rank = len(consts[x].dims) if x in consts else self.types.get(x, (0, None))[1]
                if rank:
                    self.flag(name, op, f"expected a scalar {label}, found '{x}' of rank {rank}")
        elif op == "Cast" and "to" in attrs and attrs["to"].i == TensorProto.DOUBLE:
            self.flag(name, "dtype", "expected no fp64 tensors, found Cast to DOUBLE")
        elif op == "CastLike" and len(ins) > 1:
            target = consts[ins[1]].data_type if ins[1] in consts else self.types.get(ins[1], (0, None))[0]
            if target == TensorProto.DOUBLE:
                self.flag(name, "dtype", f"expected no fp64 tensors, found CastLike to DOUBLE ('{ins[1]}')")

    def _small_value(self, tensor: TensorProto) -> np.ndarray | None:
        """The value of a tiny constant; None when it is stored externally and the data cannot be read."""
        if np.prod(tensor.dims, dtype=np.int64) > 16:
            return None
        if tensor.data_location == TensorProto.EXTERNAL and self.base_dir is None:
            return None
        try:
            return numpy_helper.to_array(tensor, base_dir=os.fspath(self.base_dir or ""))
        except Exception:  # missing/unreadable data file (onnx raises ValidationError, OSError, ...): value unknown
            return None


def _constant_tensor(node: onnx.NodeProto) -> TensorProto:
    """The tensor a Constant node produces (its dims and type; value_* attributes become tensors)."""
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            dtype = np.float32 if "float" in attr.name else np.int64
            return numpy_helper.from_array(np.array(helper.get_attribute_value(attr), dtype=dtype), node.output[0])
    return TensorProto(name=node.output[0])


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """Body graphs of control-flow nodes (Loop/If/Scan), in attribute order."""
    out: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out
