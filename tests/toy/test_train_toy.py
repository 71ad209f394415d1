"""btp-train-toy: answer-only labels over chat turns, a seeded run that repeats exactly, a loadable output."""

import json
import random
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from btp.cli import train_toy
from btp.compiler import load_model
from btp.toy import task as toy_task
from btp.toy import training


def test_labels_cover_only_the_answers_and_eos():
    spec, _, processor = training.build(0)
    tok = processor.tokenizer
    samples = toy_task.make_split("train", 3)
    extra = [training.extra_turns(s, k, random.Random(k)) for k, s in enumerate(samples)]
    batch = training.encode_batch(processor, samples, extra)
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
        weights = batch["weights"][row]
        assert torch.all(weights[~kept] == 0) and torch.isclose(weights.sum(), torch.tensor(1.0 + len(more)))
        # every answer token carries the kind of its question, in turn order
        kinds = batch["kinds"][row]
        assert torch.equal(kinds >= 0, kept)
        spans = [k for i, k in enumerate(kinds.tolist()) if k >= 0 and (i == 0 or kinds[i - 1] < 0)]
        assert [training.TURN_KINDS[k] for k in spans] == [toy_task.kind_of(q) for q in [s.question] +
                                                                 [q for q, _ in more]]
        assert int((ids == tok.convert_tokens_to_ids("<image>")).sum()) == (spec.image_size // spec.patch_size) ** 2
    # the first turn of a conversation is exactly the one-question prompt the model is asked at test time
    first = processor(images=[samples[0].image], text=[training.chat_prompt(processor, samples[0].question)],
                      return_tensors="pt")["input_ids"][0]
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    assert torch.equal(row[: len(first)], first)


def test_named_objects_carry_their_cell_and_counted_words_their_count():
    _, model, processor = training.build(0)
    tok = processor.tokenizer
    objects = (toy_task.Object(0, "square", "red", "large"), toy_task.Object(5, "circle", "blue", "small"),
               toy_task.Object(7, "cross", "red", "small"))
    sample = toy_task.Sample(toy_task.render(objects), "Is there a red square left of the blue circle?", "yes",
                             "left_of", objects)
    extra = [[("Where is the red cross?", "bottom middle"), ("How many red objects are there?", "two"),
              ("How many triangles are there?", "zero"), (toy_task.DESCRIBE, toy_task.describe(objects))]]
    batch = training.encode_batch(processor, [sample], extra)
    ids, cells, counts = batch["input_ids"][0], batch["cells"][0], batch["counts"][0]
    named = (cells >= 0).nonzero().flatten().tolist()
    # the shape words of the three named objects, in question order; not the description's words
    assert [tok.decode([int(ids[t])]).strip() for t in named] == ["square", "circle", "cross"]
    assert [int(cells[t]) for t in named] == [0, 5, 7]
    counted = (counts >= 0).nonzero().flatten().tolist()
    assert [tok.decode([int(ids[t])]).strip() for t in counted] == ["objects", "triangles"]
    assert [int(counts[t]) for t in counted] == [2, 0]
    colours = [training.COLOUR_NAMES[int(batch["colours"][0, t])] for t in named]
    assert colours == ["red", "blue", "red"] and torch.equal(batch["colours"][0] >= 0, cells >= 0)
    # an object the scene holds twice has no one cell to read
    twice = objects + (toy_task.Object(8, "circle", "blue", "large"),)
    again = toy_task.Sample(toy_task.render(twice), "Where is the blue circle?", "", "where", twice)
    assert (training.encode_batch(processor, [again])["cells"] < 0).all()
    readout = training.QuestionReadout(model, tok, 3, colour_layer=1)
    model(**{k: v for k, v in batch.items() if k not in training.TRAINING_KEYS})
    read = readout(batch)
    assert set(read) == {"cell", "count", "colour"} and all(v.ndim == 0 and v.item() > 0 for v in read.values())
    sum(read.values()).backward()
    assert readout.cell.weight.grad.abs().sum() > 0 and readout.count.weight.grad.abs().sum() > 0
    assert readout.colour_scale.grad != 0  # the colour head: the state's product with the colour words' embeddings
    assert not any(p is model.get_input_embeddings().weight for p in readout.parameters())
    # the gradient reaches the text layers up to the read-outs', not past them
    layers = model.model.language_model.layers
    assert layers[2].mlp.down_proj.weight.grad.abs().sum() > 0 and layers[3].mlp.down_proj.weight.grad is None


def test_extra_turns_ask_other_questions_about_the_scene():
    sample = toy_task.make_sample("train", 5)
    turns = training.extra_turns(sample, 7, random.Random(0))
    assert len(turns) == 7 and sample.question not in [q for q, _ in turns]
    assert turns[0][0] in (toy_task.DESCRIBE, toy_task.LOCATE)
    assert not {toy_task.DESCRIBE, toy_task.LOCATE} & {q for q, _ in turns[1:]}
    assert all(toy_task.solve(sample.objects, q) == a for q, a in turns)
    plain = training.extra_turns(sample, 3, random.Random(0), describe=False)
    assert len(plain) == 3 and not {toy_task.DESCRIBE, toy_task.LOCATE} & {q for q, _ in plain}


def test_extra_turns_balance_the_question_kinds():
    """A scene holds far more left-of and attribute questions than where and count ones; the turns do not."""
    kinds = {q: k for s in toy_task.make_split("train", 200) for k, q, _ in toy_task.scene_questions(s.objects)}
    drawn = Counter()
    pool = Counter()
    rng = random.Random(0)
    for s in toy_task.make_split("train", 200):
        pool.update(k for k, _, _ in toy_task.scene_questions(s.objects))
        drawn.update(kinds[q] for q, _ in training.extra_turns(s, 7, rng, describe=False))
    assert pool["left_of"] > 3 * pool["where"]
    assert max(drawn.values()) < 2 * min(drawn.values())


def test_the_loss_reports_each_kind_of_answer():
    samples = toy_task.make_split("train", 6)
    _, model, processor = training.build(0)
    extra = [training.extra_turns(s, 3, random.Random(0)) for s in samples]
    by_kind = {}
    loss = training.turn_loss(model, training.encode_batch(processor, samples, extra), by_kind)
    asked = {toy_task.kind_of(q) for s, more in zip(samples, extra) for q in [s.question, *(q for q, _ in more)]}
    assert set(by_kind) == asked and all(v > 0 for v in by_kind.values())
    assert min(by_kind.values()) <= loss.item() <= max(by_kind.values())


def test_patch_labels_follow_the_pixels():
    side = 9
    objects = (toy_task.Object(0, "square", "red", "large"), toy_task.Object(4, "circle", "blue", "small"))
    sample = toy_task.Sample(toy_task.render(objects), "Describe the scene.", "", "", objects)
    labels = training.patch_labels(sample, side).reshape(side, side, 3)
    red = [list(toy_task.COLOURS).index("red") + 1, toy_task.SHAPES.index("square") + 1,
           toy_task.SIZES.index("large") + 1]
    assert labels[0, 0].tolist() == red and labels[1, 1].tolist() == red
    assert labels[4, 4, 0] == list(toy_task.COLOURS).index("blue") + 1
    assert labels[8, 8].tolist() == [0, 0, 0] and labels[0, 5].tolist() == [0, 0, 0]
    cells = training.patch_cells(side, toy_task.IMAGE_SIZE).reshape(side, side)
    assert cells[0, 0] == 0 and cells[2, 3] == 1 and cells[4, 4] == 4 and cells[8, 8] == 8
    # every labelled patch lies in its object's cell
    assert set(cells[labels[..., 0] > 0].tolist()) == {0, 4}


def test_patch_probe_reads_attributes_through_the_word_embeddings():
    _, model, processor = training.build(0)
    embed = model.get_input_embeddings()
    probe = training.PatchProbe(embed, processor.tokenizer)
    assert not any(p is embed.weight for p in probe.parameters())  # the embedding stays the text model's
    cells = training.patch_cells(9, toy_task.IMAGE_SIZE)
    labels = torch.zeros(2, 81, 3, dtype=torch.long)
    labels[:, :9] = torch.tensor([1, 1, 2])  # red circle, large
    red, circle, large = training.word_ids(processor.tokenizer, ["red", "circle", "large"])
    like_words = (embed.weight[red] + embed.weight[circle] + embed.weight[large]).detach()
    tokens = torch.zeros(2, 81, embed.weight.shape[1])
    tokens[:, :9] = like_words
    random_tokens = torch.randn_like(tokens)
    random_tokens[:, 9:] = 0
    # a token that looks like the words of its labels reads better than a random one
    assert probe(tokens, labels, cells) < probe(random_tokens, labels, cells)
    tokens.requires_grad_(True)
    loss = probe(tokens, labels, cells)
    loss.backward()
    assert loss.ndim == 0 and embed.weight.grad[red].abs().sum() > 0 and probe.cell.weight.grad is not None


def test_attribute_words_are_single_tokens_and_others_are_refused():
    _, _, processor = training.build(0)
    ids = training.word_ids(processor.tokenizer, [*toy_task.COLOURS, *toy_task.SHAPES, *toy_task.SIZES])
    assert len(set(ids)) == len(ids)
    with pytest.raises(ValueError, match="one token"):
        training.word_ids(processor.tokenizer, ["red", "antidisestablishment"])


def test_matching_heads_start_with_keys_equal_to_queries():
    _, model, _ = training.build(0)
    cfg = model.config.text_config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for layer in model.model.language_model.layers:
        q, k = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight
        for kv in range(cfg.num_key_value_heads):
            head = kv * group
            assert torch.equal(k[kv * head_dim : (kv + 1) * head_dim], q[head * head_dim : (head + 1) * head_dim])
            other = (head + 1) * head_dim
            assert not torch.equal(k[kv * head_dim : (kv + 1) * head_dim], q[other : other + head_dim])


def test_thin_keeps_what_the_answer_needs():
    rng = random.Random(0)
    for sample in toy_task.make_split("train", 60):
        thinned = training.thin(sample, 1, rng)
        assert set(thinned.objects) <= set(sample.objects) and len(thinned.objects) <= len(sample.objects)
        assert toy_task.solve(thinned.objects, sample.question) == sample.answer
        assert thinned.image.tobytes() == toy_task.render(thinned.objects).tobytes()
    assert [training.curriculum_objects(s, 100, 0.5) for s in (0, 10, 49, 50, 99)] == [1, 2, 6, 6, 6]
    assert training.curriculum_objects(0, 100, 0) == toy_task.MAX_OBJECTS


def test_initial_positions_mark_the_cell_of_every_patch():
    codes = training.initial_positions(12, 96, 96)
    assert codes.shape == (144, 96)
    cells = [(int(codes[p, :3].argmax()), int(codes[p, 3:6].argmax())) for p in range(144)]
    assert cells[0] == (0, 0) and cells[11] == (0, 2) and cells[143] == (2, 2) and cells[4 * 12 + 4] == (1, 1)


def test_lr_schedule_warms_up_then_decays():
    lrs = [training.lr_at(s, 100, 10, 1e-3) for s in range(100)]
    assert lrs[9] == 1e-3 and lrs[0] < lrs[5] < lrs[9]
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] > 0


def test_a_short_run_repeats_exactly_and_saves_a_loadable_model(tmp_path, capsys):
    args = ["--steps", "2", "--batch", "2", "--turns", "2", "--vision-steps", "2", "--vision-batch", "3",
            "--test-samples", "6", "--threads", "1", "--quiet"]
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
    assert train_toy.main(["--out", str(tmp_path), "--vision-steps", "-1"]) == 2
    assert "500 samples" in capsys.readouterr().err
    assert train_toy.main(["--out", str(tmp_path), "--object-layer", "7"]) == 2
    assert "1 to 6; got 7 and 1" in capsys.readouterr().err
    assert train_toy.main(["--out", str(tmp_path), "--count-aux", "-1"]) == 2
    assert "'--count-aux': -1.0" in capsys.readouterr().err
