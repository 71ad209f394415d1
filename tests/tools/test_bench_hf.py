"""btp-bench's Hugging Face baseline generates from the processor's own output, in each family's form."""

import pytest
import torch
from PIL import Image

from btp.compiler import reference_pipeline
from btp.tools.bench import _HfRunner


@pytest.mark.parametrize("fixture", ["tiny", "tiny_qwen"])
def test_hf_baseline_generates_the_references_tokens(request, fixture):
    model = request.getfixturevalue(fixture)
    pipe = reference_pipeline(model, "none")
    images = [Image.linear_gradient("L").resize((200, 150)).convert("RGB")] * 2
    prompts = ["What is shown?", "Describe the colours you see."]
    runner = _HfRunner(model, pipe.encode(images, prompts), 3)
    timing = runner.run()
    assert timing["ttft_ms"] > 0 and timing["decode_tokens_per_s"] > 0 and runner.batch == 2
    with torch.inference_mode():
        hf = model.hf.generate(**runner.kwargs, max_new_tokens=3, min_new_tokens=3)
    ours = pipe.generate(images, prompts, max_new_tokens=3, min_new_tokens=3)
    assert hf[:, -3:].tolist() == [row[:3] for row in ours.token_ids]  # the same computation as the chain
