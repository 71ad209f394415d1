"""`load_model`: builtins, checkpoints on disk, and the errors for what is not a LLaVA model."""

import json

import pytest
import torch
from transformers import LlamaConfig

from btp.compiler import BUILTINS, load_model, reference_pipeline
from btp.runtime.errors import ModelError


def test_tiny_builtin_shape(tiny):
    t = tiny.text_config
    assert tiny.grid == (8, 8) and tiny.image_tokens == 64
    assert t.num_hidden_layers >= 6
    assert t.num_key_value_heads < t.num_attention_heads
    assert tiny.processor.tokenizer.padding_side == "left"
    assert tiny.processor.tokenizer.chat_template


def test_bench_builtin_shape():
    m = load_model("builtin:llava-bench")
    assert m.hidden_size >= 1024 and m.num_layers >= 16
    assert m.image_tokens == 576 and m.grid == (24, 24)
    assert m.text_config.model_type == "llama"


def test_builtins_are_deterministic(tiny):
    again = load_model("builtin:tiny-llava")
    for (name, a), b in zip(tiny.hf.state_dict().items(), again.hf.state_dict().values()):
        assert torch.equal(a, b), name


def test_save_pretrained_round_trip_is_indistinguishable(tiny, images, tmp_path):
    tiny.hf.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.fingerprint == tiny.fingerprint
    assert loaded.family.name == "llava"
    assert loaded.processor.tokenizer.chat_template == tiny.processor.tokenizer.chat_template
    a = reference_pipeline(tiny, "btp").generate(images, ["What is shown?", "Describe it."], max_new_tokens=6)
    b = reference_pipeline(loaded, "btp").generate(images, ["What is shown?", "Describe it."], max_new_tokens=6)
    assert a.prompt_ids == b.prompt_ids
    assert a.token_ids == b.token_ids and a.kept_indices == b.kept_indices


def test_unknown_builtin_is_one_clear_line():
    with pytest.raises(ModelError) as err:
        load_model("builtin:nope")
    msg = str(err.value)
    assert "unknown builtin" in msg and "builtin:tiny-llava" in msg and "builtin:toy-vlm" in msg and "\n" not in msg
    assert set(BUILTINS) == {"tiny-llava", "llava-bench", "toy-vlm"}


def test_missing_path_is_one_clear_line(tmp_path):
    with pytest.raises(ModelError) as err:
        load_model(str(tmp_path / "nowhere"))
    assert "no such directory" in str(err.value) and "\n" not in str(err.value)


def test_non_llava_checkpoint_is_refused(tmp_path):
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    with pytest.raises(ModelError) as err:
        load_model(str(tmp_path))
    msg = str(err.value)
    assert "not a LLaVA-style checkpoint" in msg and "'llama'" in msg and "\n" not in msg


def test_directory_without_config_is_refused(tmp_path):
    (tmp_path / "notes.json").write_text(json.dumps({}))
    with pytest.raises(ModelError) as err:
        load_model(str(tmp_path))
    assert "cannot read a model config" in str(err.value)


def test_bad_dtype_is_refused():
    with pytest.raises(ModelError, match="dtype must be one of"):
        load_model("builtin:tiny-llava", dtype="float64")


def test_cls_keeping_feature_strategy_is_refused(tiny):
    import copy

    model = copy.deepcopy(tiny.hf)
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ModelError, match="vision_feature_select_strategy 'full'"):
        tiny.family.check(model)
