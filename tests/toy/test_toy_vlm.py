"""builtin:toy-vlm: the trained weights ship in the package, load offline, and answer the toy task."""

import pytest
from transformers import LlavaProcessor

from btp.compiler import load_model
from btp.toy import task as toy_task
from btp.toy.builtins import BUILTINS, weights_dir
from btp.toy.training import accuracy

pytestmark = pytest.mark.skipif(not weights_dir("toy-vlm").joinpath("model.safetensors").is_file(),
                                reason="builtin:toy-vlm has no trained weights in the package yet (issue 7)")


@pytest.fixture(scope="module")
def toy():
    """The shipped model, read from the package data with local_files_only (no hub)."""
    return load_model("builtin:toy-vlm")


def test_weights_ship_as_safetensors():
    files = {p.name for p in weights_dir("toy-vlm").iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= files
    size = sum(p.stat().st_size for p in weights_dir("toy-vlm").iterdir() if p.is_file())
    assert size < 15e6


def test_toy_vlm_loads_offline_with_its_grid(toy):
    spec = BUILTINS["toy-vlm"]
    side = spec.image_size // spec.patch_size
    assert toy.grid == (side, side) and toy.image_tokens == side * side
    assert toy.image_size == toy_task.IMAGE_SIZE
    assert toy.family.name == "llava" and toy.num_layers == spec.layers and toy.hidden_size == spec.hidden
    assert toy.config.vision_feature_layer == -2 and toy.config.vision_feature_select_strategy == "default"
    assert isinstance(toy.processor, LlavaProcessor)
    assert toy.processor.tokenizer.padding_side == "left" and toy.processor.tokenizer.chat_template
    assert toy.processor.tokenizer.convert_tokens_to_ids("<image>") == toy.image_token_id


def test_fingerprint_is_stable_across_loads(toy):
    again = load_model("builtin:toy-vlm")
    assert again.fingerprint == toy.fingerprint
    assert all((a == b).all() for a, b in zip(toy.hf.state_dict().values(), again.hf.state_dict().values()))


def test_prompt_expands_to_the_grid(toy):
    sample = toy_task.make_sample("test", 0)
    prompt = toy.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}],
        add_generation_prompt=True)
    assert prompt == f"USER: <image>\n{sample.question} ASSISTANT:"
    ids = toy.processor(images=[sample.image], text=[prompt], return_tensors="pt")["input_ids"]
    assert int((ids == toy.image_token_id).sum()) == toy.image_tokens


def test_unpruned_model_answers_the_test_split(toy):
    acc, _ = accuracy(toy.hf, toy.processor, toy_task.make_split("test", 40), batch_size=40)
    assert acc >= 0.9
