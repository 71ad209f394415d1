"""The ONNX Runtime pipeline against the torch reference, graph by graph and end to end."""

import pytest
import torch

from btp.backends.onnxruntime_backend import OrtEngine
from btp.compiler import reference_pipeline
from btp.runtime import Pipeline
from btp.tools.check import capture_feeds

PROMPTS = ["What is shown in the image?", "Describe the colours and the shapes of everything you see here."]
PRESETS = ["none", "btp", "fastv", "pdrop", "divprune"]


@pytest.fixture(scope="module")
def pipelines(tiny, artifact):
    cache = {}

    def get(preset):
        if preset not in cache:
            ort_pipe = Pipeline.load(artifact(preset))
            ref = reference_pipeline(tiny, preset, max_positions=ort_pipe.spec.max_positions)
            cache[preset] = ort_pipe, ref
        return cache[preset]

    return get


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("batch", [1, 2])
def test_onnxruntime_pipeline_equals_reference(pipelines, images, preset, batch):
    ort_pipe, ref = pipelines(preset)
    a = ort_pipe.generate(images[:batch], PROMPTS[:batch], max_new_tokens=32, output_logits=True)
    b = ref.generate(images[:batch], PROMPTS[:batch], max_new_tokens=32, output_logits=True)
    if batch == 2:
        assert len(a.prompt_ids[0]) != len(a.prompt_ids[1])
    assert (a.logits[0] - b.logits[0]).abs().max().item() <= 1e-4
    assert a.kept_indices == b.kept_indices
    assert a.token_ids == b.token_ids
    assert len(a.token_ids[0]) == 32 or a.token_ids[0][-1] in ort_pipe.spec.eos_token_ids


@pytest.mark.parametrize("preset", ["btp", "pdrop"])
def test_image_after_the_question_prunes_the_same_as_the_reference(pipelines, images, preset):
    """A chat template may put the image after the question (builtin:toy-vlm's does): the image span then
    starts at a different place in each row, and the pruning follows it."""
    ort_pipe, ref = pipelines(preset)
    prompts = ["USER: What is shown?\n<image> ASSISTANT:",
               "USER: Describe the colours and the shapes of everything here.\n<image> ASSISTANT:"]
    a = ort_pipe.generate(images, prompts, max_new_tokens=8, output_logits=True)
    b = ref.generate(images, prompts, max_new_tokens=8, output_logits=True)
    starts = [ids.index(ort_pipe.spec.image_token_id) for ids in a.prompt_ids]
    assert starts[0] != starts[1] and min(starts) > 1
    assert (a.logits[0] - b.logits[0]).abs().max().item() <= 1e-4
    assert a.kept_indices == b.kept_indices and a.token_ids == b.token_ids


@pytest.mark.parametrize("preset", ["btp", "divprune"])
def test_every_graph_equals_its_torch_module_on_captured_inputs(pipelines, images, preset):
    ort_pipe, ref = pipelines(preset)
    feeds = capture_feeds(ref, [(images, PROMPTS)], steps=3)  # batch 2, different lengths
    assert set(feeds) == set(ort_pipe.engines)
    for name, calls in feeds.items():
        for feed in calls:  # prefill and decode shapes alike
            want = ref.engines[name].run(feed)
            got = ort_pipe.engines[name].run(feed)
            assert list(got) == list(want)
            for key in want:
                w, g = want[key], got[key]
                assert g.shape == w.shape and g.dtype == w.dtype, (name, key)
                if w.dtype.is_floating_point:
                    assert (g - w).abs().max().item() <= 1e-4, (name, key)
                else:
                    assert torch.equal(g, w), (name, key)


def test_prune_graph_has_topk_no_nonzero_and_symbolic_output_shapes(artifact):
    import onnx

    model = onnx.load(str(artifact("btp") / "onnx" / "prune1.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert "TopK" in ops and "GatherElements" in ops
    assert "Loop" in ops  # the greedy diversity fill, a counted loop
    assert not ops & {"NonZero", "Unique"}
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert dims["pruned_hidden_states"] == ["batch", "seq - 32", 64]  # T - 64 + 32
    assert dims["pruned_position_ids"] == ["batch", "seq - 32"]
    assert dims["keep_indices"] == ["batch", 32]
    stage = onnx.load(str(artifact("btp") / "onnx" / "stage1.onnx"), load_external_data=False)
    sdims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in stage.graph.output}
    assert sdims["present.1.key"] == ["batch", 2, "past + seq", 16]


def test_concurrent_generate_calls_match_sequential(pipelines, images, assert_concurrent_calls_match_sequential):
    assert_concurrent_calls_match_sequential(pipelines("btp")[0], images)


def test_engine_reports_the_graph_io(artifact):
    engine = OrtEngine(artifact("btp") / "onnx" / "prune2.onnx")
    assert engine.input_names == ["hidden_states", "position_ids", "attention_mask", "scores", "image_start"]
    assert engine.output_names[-1] == "keep_indices"


def test_head_graph_takes_one_static_row(artifact):
    """The head reads row 0 of a static single row (no negative Gather index over a dynamic axis)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(artifact("btp") / "onnx" / "head.onnx")
    (inp,) = m.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "hidden_states" and dims[0].dim_param and dims[1].dim_value == 1
    consts = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    consts |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in m.graph.node if n.op_type == "Constant"}
    indices = [consts[n.input[1]] for n in m.graph.node if n.op_type == "Gather" and n.input[1] in consts]
    assert all((i >= 0).all() for i in indices)
