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
* TopK: ITopKLayer only returns sorted results and caps K at 3840. K is a build-time constant, or (the prune graphs
  of a plan of shares, whose kept counts follow the image's token count) a *shape value*: computed from the graph
  inputs' dims only (Shape, constants and integer arithmetic on them). Why a shape-derived K rather than one engine
  per image size: the TopK importer has passed a non-initializer K to the layer since TensorRT 8.6
  (``layer->setInput(1, *convertToScalar(ctx, K))``, 10.x ``DEFINE_BUILTIN_OP_IMPORTER(TopK)``), and a K computed
  from dims is a shape tensor, so every shape after pruning is an expression TensorRT evaluates from the input
  dims when a context's shapes are set; nothing depends on the data and one engine covers the whole image-token
  range of its profiles. A K that depends on tensor *values* is rejected: its output would need an allocator.
* Loop: scan outputs of dynamic length are rejected by the parser. The trip count is a constant or, as K, a shape
  value (the importer casts it to INT32 for ``addTripLimit(kCOUNT)``, which needs it before the loop starts).
* CumSum's axis must be an initializer and Range's start/limit/delta must be 0-d tensors for the parser.
* No fp64: TensorRT has no double kernels and silently casts DOUBLE down to FLOAT (clamping), which would make the
  engine disagree with the PyTorch reference.

The importer rules (``_check_constraints``) restate what the parser's op importers enforce, for every op the btp
graphs contain and where a graph shows it statically. Source: onnx-tensorrt ``onnxOpImporters.cpp`` and
``importerUtils.cpp`` at the 10.8-GA and 10.10-GA releases (identical for these ops) and at 10.15-GA; no 11.x
parser source was available, and the TensorRT 11 release notes list no change to these importers. Per op:

* Loop (10.8 l.3066-3190, 10.10 l.3155-3279): at least two inputs; the body's condition input is registered only
  when the outer condition is given, and its iteration number only when a usable trip count is (absent, or an
  INT64 constant >= 2^31-1, counts as none), so a body node reading an unregistered one fails with "Node input was
  not registered"; trip count and condition must be scalars (or one-element); a loop with neither never stops.
  Not linted: with a condition given, the parser binds the body's condition input to the *initial* condition on
  every iteration; that differs from ONNX only when the body changes its condition.
* TopK (10.8 l.6044-6109): exactly two inputs (opset >= 10); K a scalar or one element; axis inside the rank; no
  UINT8. K <= 3840 and sorted=1 come from the operator table (``docs/operators.md``), not the importer.
* Gather, GatherElements, GatherND (10.8 l.2027-2090): no UINT8 data; axis inside the rank; GatherND's last
  indices dimension must be static (TensorRT's IGatherLayer in kND mode).
* Range (10.8 l.4359-4441): start, limit and delta of one type, and that type INT32, INT64 or FLOAT (fp16/bf16
  are rejected although the operator table lists them).
* Clip (10.8 l.659-735): no UINT8, BOOL or INT8 input; opset >= 11 with exactly two inputs and an empty min
  fails ("Clip min value must be an initializer!"). INT64 Clip with run-time min/max is supported.
* Squeeze (10.8 l.5772-5826): without an axes input the input shape must be fully static ("Cannot infer squeeze
  dimensions from a dynamic shape!").
* Shape with start/end (10.8 l.5410-5440): clamped to the rank, never rejected: nothing to lint.
* ReduceL2 (10.8 l.4498-4507 and ``reduceTensor``): the axes input must be an initializer or Constant; integer
  and bool inputs are rejected (the final SQRT has no integer kernel).
* IsInf (10.8 l.2919-2966): float inputs only; with only one of detect_positive/detect_negative set the importer
  compares against an FP32 zero without a cast, so the input must be FP32 there (read from the source, not run).
* Where (10.8 l.6342-6368), ArgMax/ArgMin (``argMinMaxHelper``): no UINT8; ArgMax's axis inside the rank.
* Or/And/Xor need BOOL inputs; Min/Max/Sum/Sub/Mul/Div/Greater/Less take no BOOL; Pow takes no BOOL and, before
  10.12, no INT32/INT64 (``elementwiseCheck``, 10.10 l.537-579). Equal takes every type.
* CumSum: the importer checks nothing since 10.8 (dynamic axis); the operator table still asks for a constant
  axis (linted) and lists only FP32/FP16/BF16 data, while the btp graphs take an INT64 cumulative sum of the
  attention mask. That type is not linted: the parser imports it, and whether the layer builds is unverified.
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
        self.shapes: dict[str, tuple[int | None, ...]] = {}  # value name -> dims (None where symbolic or unknown)
        self.shape_values: set[str] = set()  # values computed from input dims and constants only
        self.opset = max((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), default=0)
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
                if tt.HasField("shape"):
                    self.shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                                 for d in tt.shape.dim)
        for t in graph.initializer:
            self.types[t.name] = (t.data_type, len(t.dims))
            self.shapes[t.name] = tuple(t.dims)
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
            elif _shape_value(node, lambda x: x in consts or x in self.shape_values):
                self.shape_values.update(node.output)
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
            if k not in consts and k not in self.shape_values:
                self.flag(name, op, f"expected K to be a build-time constant or computed from input dims only, "
                                    f"found '{k}', which depends on tensor values")
            elif k in consts and (value := self._small_value(consts[k])) is not None and \
                    int(value.reshape(-1)[0]) > MAX_TOPK_K:
                self.flag(name, op, f"expected K <= {MAX_TOPK_K}, found K={int(value.reshape(-1)[0])}")
        elif op == "Loop":
            self._check_loop(name, node, ins, consts)
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
        self._check_importer(name, node, ins, attrs, consts)

    def _dtype(self, value: str, consts: dict[str, TensorProto]) -> int | None:
        if value in consts:
            return consts[value].data_type
        return self.types.get(value, (None, None))[0]

    def _shape(self, value: str, consts: dict[str, TensorProto]) -> tuple[int | None, ...] | None:
        if value in consts:
            return tuple(consts[value].dims)
        return self.shapes.get(value)

    def _one_element(self, name: str, op: str, label: str, value: str, consts: dict[str, TensorProto]) -> None:
        """A scalar input (the parser's `convertToScalar`): rank 0, or a static shape of one element."""
        shape = self._shape(value, consts)
        if shape is not None and (None in shape or int(np.prod(shape, dtype=np.int64)) != 1):
            self.flag(name, op, f"expected {label} to be a scalar or one element, found '{value}' of shape "
                                f"{list(shape)}")

    def _axis(self, name: str, op: str, axis: int, data: str, consts: dict[str, TensorProto]) -> None:
        rank = len(shape) if (shape := self._shape(data, consts)) is not None else None
        if rank is not None and not -rank <= axis < rank:
            self.flag(name, op, f"expected axis in [{-rank}, {rank - 1}] for '{data}' of rank {rank}, found {axis}")

    def _not_types(self, name: str, op: str, values, banned: dict[int, str], consts) -> None:
        """One violation per banned type, naming every input of that type."""
        found: dict[str, list[str]] = {}
        for x in values:
            if x and (t := self._dtype(x, consts)) in banned:
                found.setdefault(banned[t], []).append(f"'{x}'")
        for type_name, names in found.items():
            self.flag(name, op, f"expected no {type_name} input, found {', '.join(names)} of type {type_name}")

    def _check_loop(self, name: str, node: onnx.NodeProto, ins: list[str], consts: dict[str, TensorProto]) -> None:
        """onnx-tensorrt's Loop importer (10.8 l.3066-3190; 10.15 the same for these rules)."""
        op = "Loop"
        if len(ins) < 2:
            self.flag(name, op, f"expected at least 2 inputs (trip count, condition), found {len(ins)}")
            return
        carried = len(ins) - 2
        if len(node.output) > carried:
            n = len(node.output) - carried
            self.flag(name, op, f"scan outputs of dynamic length are not allowed, found {n} scan output(s)")
        trip, cond = ins[0], ins[1]
        usable_trip = bool(trip)
        if not trip:
            self.flag(name, op, "expected a constant trip count M, found none (a condition-only loop)")
        elif trip in self.shape_values:
            pass  # computed from input dims: known when the context's shapes are set, before the loop starts
        elif trip not in consts:
            self.flag(name, op, f"expected a constant trip count M or one computed from input dims only, found "
                                f"'{trip}', which depends on tensor values")
        else:
            value = self._small_value(consts[trip])
            if value is not None and consts[trip].data_type == TensorProto.INT64 and value.size and \
                    int(value.reshape(-1)[0]) >= 2**31 - 1:
                usable_trip = False
                self.flag(name, op, f"expected a trip count below 2^31-1, found {int(value.reshape(-1)[0])} (the "
                                    "parser reads it as no trip count)")
        for label, x in (("the trip count", trip), ("the condition", cond)):
            if x:
                self._one_element(name, op, label, x, consts)
        body = next((a.g for a in node.attribute if a.name == "body"), None)
        if body is None or len(body.input) < 2:
            return
        read = _reads(body)
        if not cond and body.input[1].name in read:
            self.flag(name, op, f"the outer condition is empty, so the parser never registers the body's condition "
                                f"input '{body.input[1].name}', and a body node reads it")
        if not usable_trip and body.input[0].name in read:
            self.flag(name, op, f"without a usable trip count the parser never registers the body's iteration "
                                f"number '{body.input[0].name}', and a body node reads it")

    def _check_importer(self, name: str, node: onnx.NodeProto, ins: list[str], attrs: dict,
                        consts: dict[str, TensorProto]) -> None:
        """What the onnx-tensorrt op importers (10.8/10.10/10.15) reject, where the graph shows it statically."""
        op = node.op_type
        u8 = {TensorProto.UINT8: "UINT8"}
        ints = {TensorProto.INT32: "INT32", TensorProto.INT64: "INT64"}
        boolean = {TensorProto.BOOL: "BOOL"}
        if op == "TopK":
            if self.opset >= 10 and len(ins) != 2:
                self.flag(name, op, f"expected 2 inputs (X, K) for opset >= 10, found {len(ins)}")
            if len(ins) > 1 and ins[1]:
                self._one_element(name, op, "K", ins[1], consts)
            self._axis(name, op, attrs["axis"].i if "axis" in attrs else -1, ins[0], consts)
            self._not_types(name, op, ins[:1], u8, consts)
        elif op in ("Gather", "GatherElements", "GatherND"):
            self._not_types(name, op, ins[:1], u8, consts)
            if op != "GatherND":
                self._axis(name, op, attrs["axis"].i if "axis" in attrs else 0, ins[0], consts)
            elif len(ins) > 1 and (shape := self._shape(ins[1], consts)) is not None and shape and shape[-1] is None:
                self.flag(name, op, f"expected a static last dimension of the indices '{ins[1]}', found a "
                                    "symbolic one")
        elif op == "Range":
            types = [self._dtype(x, consts) for x in ins[:3]]
            if None not in types and len(set(types)) > 1:
                names = [TensorProto.DataType.Name(t) for t in types]
                self.flag(name, op, f"expected start, limit and delta of one type, found {', '.join(names)}")
            allowed = {TensorProto.INT32, TensorProto.INT64, TensorProto.FLOAT}
            for t in {t for t in types if t is not None and t not in allowed}:
                self.flag(name, op, f"expected INT32, INT64 or FLOAT inputs, found {TensorProto.DataType.Name(t)}")
        elif op == "Clip":
            self._not_types(name, op, ins[:1], {**u8, **boolean, TensorProto.INT8: "INT8"}, consts)
            if self.opset >= 11 and len(ins) == 2 and not ins[1]:
                self.flag(name, op, "expected a min input or none, found an empty min with no max (the parser "
                                    "fails with 'Clip min value must be an initializer!')")
        elif op == "Squeeze":
            axes = ins[1] if len(ins) > 1 else ""
            if not axes and "axes" not in attrs:
                shape = self._shape(ins[0], consts)
                if shape is None or None in shape:
                    self.flag(name, op, f"expected an axes input: without one the input '{ins[0]}' must have a "
                                        "fully static shape")
        elif op == "ReduceL2":
            if len(ins) > 1 and ins[1] and ins[1] not in consts:
                self.flag(name, op, f"expected the axes input to be an initializer or Constant, found '{ins[1]}'")
            self._not_types(name, op, ins[:1], {**ints, **boolean, **u8}, consts)
        elif op == "IsInf":
            self._not_types(name, op, ins[:1], {**ints, **boolean, **u8}, consts)
            both = all(attrs[a].i if a in attrs else 1 for a in ("detect_positive", "detect_negative"))
            halves = {TensorProto.FLOAT16: "FLOAT16", TensorProto.BFLOAT16: "BFLOAT16"}
            if not both:
                self._not_types(name, op, ins[:1], halves, consts)
        elif op in ("Where", "ArgMax", "ArgMin"):
            self._not_types(name, op, ins, u8, consts)
            if op != "Where":
                self._axis(name, op, attrs["axis"].i if "axis" in attrs else 0, ins[0], consts)
        elif op in ("Or", "And", "Xor"):
            wrong = [f"'{x}' of type {TensorProto.DataType.Name(t)}" for x in ins
                     if x and (t := self._dtype(x, consts)) is not None and t != TensorProto.BOOL]
            if wrong:
                self.flag(name, op, f"expected BOOL inputs, found {', '.join(wrong)}")
        elif op in ("Min", "Max", "Sum", "Sub", "Mul", "Div", "Greater", "Less", "Pow"):
            self._not_types(name, op, ins, {**boolean, **(ints if op == "Pow" else {})}, consts)

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


# Ops whose output is a shape value when every input is one (or a constant): TensorRT's shape-tensor arithmetic.
_SHAPE_ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Min", "Max", "Gather", "Reshape",
                               "Unsqueeze", "Squeeze", "Concat", "Cast", "Slice", "Identity", "Equal", "Less",
                               "Greater", "Where"})


def _shape_value(node: onnx.NodeProto, known) -> bool:
    """Whether `node`'s outputs are computed from input dims only: a Shape/Size, or shape arithmetic on such values
    and constants (`known(name)`)."""
    if node.domain not in DEFAULT_DOMAINS:
        return False
    if node.op_type in ("Shape", "Size"):
        return True
    return node.op_type in _SHAPE_ARITHMETIC and all(known(x) for x in node.input if x)


def _constant_tensor(node: onnx.NodeProto) -> TensorProto:
    """The tensor a Constant node produces (its dims and type; value_* attributes become tensors)."""
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            dtype = np.float32 if "float" in attr.name else np.int64
            return numpy_helper.from_array(np.array(helper.get_attribute_value(attr), dtype=dtype), node.output[0])
    return TensorProto(name=node.output[0])


def _reads(graph: onnx.GraphProto) -> set[str]:
    """Every value name a graph's nodes (and nested subgraphs) consume, or its outputs pass straight through."""
    out = {o.name for o in graph.output}
    for node in graph.node:
        out.update(node.input)
        for g in _subgraphs(node):
            out |= _reads(g)
    return out


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """Body graphs of control-flow nodes (Loop/If/Scan), in attribute order."""
    out: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out
