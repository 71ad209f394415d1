"""What only a CUDA host can show (marked `gpu`, skipped elsewhere; `python -m btp.cli.gpu_check` runs them):
the reference chain on CUDA against Hugging Face on CUDA, pruned against unpruned, and ONNX Runtime's CUDA
binding (onnxruntime-gpu) against the reference."""

import pytest
import torch

from btp.compiler import load_model, reference_pipeline
from btp.runtime import Pipeline

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROMPTS = ["What is shown in the image?", "Describe the colours and the shapes of everything you see here."]


@pytest.fixture(scope="module")
def cuda_tiny():
    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions in fp32, as on the CPU
    torch.backends.cuda.matmul.allow_tf32 = False
    model = load_model("builtin:tiny-llava")
    model.hf.to("cuda")
    return model


def test_reference_on_cuda_equals_hugging_face_on_cuda(cuda_tiny, images):  # pragma: no cover - GPU hosts only
    pipe = reference_pipeline(cuda_tiny, "none")
    out = pipe.generate(images, PROMPTS, max_new_tokens=8, output_logits=True)
    inp = pipe.prepare(images, PROMPTS)
    hf = cuda_tiny.hf.generate(input_ids=inp.input_ids.cuda(), attention_mask=inp.attention_mask.cuda(),
                               pixel_values=inp.pixel_values.cuda(), max_new_tokens=8, do_sample=False,
                               output_logits=True, return_dict_in_generate=True)
    for ours, theirs in zip(out.logits, hf.logits):
        assert (ours.cuda() - theirs.float()).abs().max().item() <= 1e-4


def test_pruned_differs_from_unpruned_on_cuda_and_keeps_the_plan(cuda_tiny, images):  # pragma: no cover
    pruned = reference_pipeline(cuda_tiny, "btp")
    a = pruned.generate(images, PROMPTS, max_new_tokens=4, output_logits=True)
    b = reference_pipeline(cuda_tiny, "none").generate(images, PROMPTS, max_new_tokens=4, output_logits=True)
    assert [len(k) for k in a.kept_indices[0]] == [s.keep for s in pruned.plan.stages]
    assert (a.logits[0] - b.logits[0]).abs().max().item() > 1e-3


def test_onnxruntime_cuda_binding_equals_the_reference(artifact, images):  # pragma: no cover - GPU hosts only
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    pipe = Pipeline.load(artifact("btp"), device="cuda")
    ref = reference_pipeline(load_model("builtin:tiny-llava"), "btp", max_positions=pipe.spec.max_positions)
    a = pipe.generate(images, PROMPTS, max_new_tokens=8)
    b = ref.generate(images, PROMPTS, max_new_tokens=8)
    assert a.token_ids == b.token_ids and a.kept_indices == b.kept_indices
