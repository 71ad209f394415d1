"""btp-train-toy: answer-only labels over chat turns, a seeded run that repeats exactly, a loadable output."""

import json
import random

import torch
from safetensors.torch import load_file

from btp.compiler import load_model
from btp.tools import toy_task, train_toy


def test_labels_cover_only_the_answers_and_eos():
    spec, _, processor = train_toy.build(0)
    tok = processor.tokenizer
    samples = toy_task.make_split("train", 3)
    extra = [train_toy.extra_turns(s, k, random.Random(k)) for k, s in enumerate(samples)]
    batch = train_toy.encode_batch(processor, samples, extra)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for row, (s, more) in enumerate(zip(samples, extra)):
        ids = batch["input_ids"][row]
        labels = batch["labels"][row]
        kept = labels != -100
        assert torch.equal(labels[kept], ids[kept])
        expected = []
        for answer in [s.answer] + [a for _, a in more]:
            expected += tok(" " + answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert labels[kept].tolist() == expected
        assert int((ids == tok.convert_tokens_to_ids("<image>")).sum()) == (spec.image_size // spec.patch_size) ** 2
    # the first turn of a conversation is exactly the one-question prompt the model is asked at test time
    first = processor(images=[samples[0].image], text=[train_toy.chat_prompt(processor, samples[0].question)],
                      return_tensors="pt")["input_ids"][0]
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    assert torch.equal(row[: len(first)], first)


def test_extra_turns_ask_other_questions_about_the_scene():
    sample = toy_task.make_sample("train", 5)
    turns = train_toy.extra_turns(sample, 7, random.Random(0))
    assert len(turns) == 7 and sample.question not in [q for q, _ in turns]
    assert all(toy_task.solve(sample.objects, q) == a for q, a in turns)


def test_lr_schedule_warms_up_then_decays():
    lrs = [train_toy.lr_at(s, 100, 10, 1e-3) for s in range(100)]
    assert lrs[9] == 1e-3 and lrs[0] < lrs[5] < lrs[9]
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] > 0


def test_a_short_run_repeats_exactly_and_saves_a_loadable_model(tmp_path, capsys):
    args = ["--steps", "2", "--batch", "2", "--turns", "2", "--test-samples", "6", "--threads", "1", "--quiet"]
    assert train_toy.main(["--out", str(tmp_path / "a"), *args]) == 0
    assert train_toy.main(["--out", str(tmp_path / "b"), *args]) == 0
    out = capsys.readouterr().out
    assert "test split: 6 samples" in out
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert record["steps"] == 2 and record["test_samples"] == 6 and 0 <= record["test_accuracy"] <= 1
    loaded = load_model(str(tmp_path / "a"))
    assert loaded.family.name == "llava" and loaded.grid == (loaded.grid[0], loaded.grid[0])


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert train_toy.main(["--out", str(tmp_path), "--steps", "0"]) == 2
    assert train_toy.main(["--out", str(tmp_path), "--test-samples", "501"]) == 2
    assert "500 samples" in capsys.readouterr().err
