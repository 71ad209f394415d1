"""ONNX Runtime's I/O binding as the CUDA path uses it (inputs bound by pointer with their ONNX element type,
outputs read through DLPack), run here with the CPU provider's `IOBinding`, against plain `session.run`."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from btp.backends.onnxruntime_backend import ELEMENT_TYPES, OrtEngine
from btp.runtime import Pipeline

PROMPTS = ["What is shown in the image?", "Describe the colours and the shapes of everything you see here."]


class PlainEngine:
    """The same session run without a binding: numpy feeds in, numpy outputs out (fp32 and fp16 only)."""

    def __init__(self, engine: OrtEngine):
        self.engine = engine
        self.input_names, self.output_names = engine.input_names, engine.output_names

    def run(self, feeds):
        arrays = {n: feeds[n].contiguous().numpy() for n in self.input_names}
        outs = self.engine.session.run(self.output_names, arrays)
        return {n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in zip(self.output_names, outs)}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_bound_pipeline_equals_plain_session_runs(artifact, fp16_artifact, images, dtype):
    path = artifact("btp") if dtype == "float32" else fp16_artifact
    bound = Pipeline.load(path)
    plain = Pipeline.load(path)
    plain.engines = {name: PlainEngine(e) for name, e in plain.engines.items()}
    a = bound.generate(images, PROMPTS, max_new_tokens=12, output_logits=True)
    b = plain.generate(images, PROMPTS, max_new_tokens=12, output_logits=True)
    assert a.token_ids == b.token_ids and a.kept_indices == b.kept_indices
    assert bound.engines["stage0"].output_types["hidden_states"] == getattr(torch, dtype)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


def _bf16_graph(path):
    """y = Identity(x) in bf16, z = Cast(x, float): ops the CPU provider has for bf16."""
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["b", "n"])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["b", "n"])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", "n"])
    nodes = [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Cast", ["x"], ["z"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "bf16", [x], [y, z])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, path)


def test_bf16_binds_by_onnx_element_type_and_reads_back_through_dlpack(tmp_path):
    _bf16_graph(tmp_path / "bf16.onnx")
    engine = OrtEngine(tmp_path / "bf16.onnx")
    assert engine.input_types == {"x": torch.bfloat16}
    x = torch.randn(3, 5).to(torch.bfloat16)
    out = engine.run({"x": x})
    assert out["y"].dtype == torch.bfloat16 and torch.equal(out["y"], x)
    assert out["z"].dtype == torch.float32 and torch.equal(out["z"], x.float())


def test_non_contiguous_inputs_bind_their_contiguous_copy(tmp_path):
    _bf16_graph(tmp_path / "bf16.onnx")
    engine = OrtEngine(tmp_path / "bf16.onnx")
    x = torch.randn(5, 3).to(torch.bfloat16).t()  # a transposed view: strides (1, 3)
    assert not x.is_contiguous()
    assert torch.equal(engine.run({"x": x})["y"], x)


def test_every_chain_dtype_has_an_element_type():
    assert {torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool} <= set(ELEMENT_TYPES)
    names = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "BFLOAT16", torch.int64: "INT64",
             torch.int32: "INT32", torch.bool: "BOOL"}
    assert all(ELEMENT_TYPES[t] == getattr(TensorProto, n) for t, n in names.items())


def test_wrong_dtype_or_device_is_refused(tmp_path):
    _bf16_graph(tmp_path / "bf16.onnx")
    engine = OrtEngine(tmp_path / "bf16.onnx")
    with pytest.raises(TypeError, match="input x must be torch.bfloat16, got torch.float32"):
        engine.run({"x": torch.randn(2, 2)})
    with pytest.raises(TypeError, match="input x must be on cpu, got meta"):
        engine.run({"x": torch.empty(2, 2, dtype=torch.bfloat16, device="meta")})
