"""The toy model's training pieces for `btp-train-toy`: prompts and batches of the toy task, the model's
construction and initialisation, and the probe and read-outs that shape its image tokens during training (none
of them ship with the model)."""


from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter

import numpy as np
import torch

from . import task as toy_task

BUILTIN = "toy-vlm"


def chat_prompt(processor, question: str) -> str:
    """The chat-template prompt for one image and `question`, ending at 'ASSISTANT:'."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def conversation(processor, turns: list[tuple[str, str]]) -> str:
    """The chat-template text of a conversation about one image: [(question, answer)] -> 'USER: <image>\\n
    q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>...'. Its first turn is exactly the one-question prompt."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        content = [{"type": "image"}, {"type": "text", "text": question}] if i == 0 else question
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return processor.apply_chat_template(messages)


TURN_KINDS = (*toy_task.KINDS, "describe")
TRAINING_KEYS = ("labels", "weights", "kinds", "cells", "colours", "counts")  # encode_batch's targets, not model inputs


def encode_batch(processor, samples: list[toy_task.Sample],
                 extra: list[list[tuple[str, str]]] | None = None) -> dict[str, torch.Tensor]:
    """Training inputs for `samples`, each followed by its `extra` (question, answer) turns about the same image:
    input_ids, attention_mask [B, T] (left-padded), pixel_values [B, 3, H, W], labels [B, T] (-100 except on
    the tokens after each 'ASSISTANT:' up to and including its `</s>`), weights [B, T] (1 / answer length on
    those tokens, 0 elsewhere), kinds [B, T] (the index in `TURN_KINDS` of the answer's question, -1 elsewhere),
    cells [B, T] (at the shape word of each object a question names by colour and shape, as in 'Where is the red
    circle?' and both objects of a left-of question: that object's grid cell; -1 elsewhere), colours [B, T] (at
    the same words: the index in `COLOUR_NAMES` of the colour named just before; -1 elsewhere), counts [B, T] (at
    the word a count question counts, 'circles' or 'objects' in 'How many red objects': the answer's number, 0 to
    3; -1 elsewhere)."""
    extra = extra or [[] for _ in samples]
    turns = [[(s.question, s.answer), *more] for s, more in zip(samples, extra)]
    texts = [conversation(processor, t) for t in turns]
    batch = processor(images=[s.image for s in samples], text=texts, padding=True, return_tensors="pt")
    tok = processor.tokenizer
    marker = tok(" ASSISTANT:", add_special_tokens=False).input_ids
    ids = batch["input_ids"]
    labels = torch.full_like(ids, -100)
    weights = torch.zeros(ids.shape)
    kinds = torch.full_like(ids, -1)
    cells = torch.full_like(ids, -1)
    colours = torch.full_like(ids, -1)
    counts = torch.full_like(ids, -1)
    colour_ids, shape_ids = word_ids(tok, COLOUR_NAMES), word_ids(tok, toy_task.SHAPES)
    plural_ids = word_ids(tok, [toy_task.PLURALS[shape] for shape in toy_task.SHAPES])
    many, objects_id = word_ids(tok, ["many", "objects"])
    for row in range(ids.shape[0]):
        seq = ids[row].tolist()
        pairs = Counter((o.colour, o.shape) for o in samples[row].objects)
        where = {(o.colour, o.shape): o.cell for o in samples[row].objects if pairs[(o.colour, o.shape)] == 1}
        for t in range(1, len(seq)):
            if seq[t - 1] in colour_ids and seq[t] in shape_ids:
                key = (COLOUR_NAMES[colour_ids.index(seq[t - 1])], toy_task.SHAPES[shape_ids.index(seq[t])])
                cells[row, t] = where.get(key, -1)
                colours[row, t] = colour_ids.index(seq[t - 1])
            if seq[t - 1] == many and seq[t] in plural_ids:
                shape = toy_task.SHAPES[plural_ids.index(seq[t])]
                n = sum(o.shape == shape for o in samples[row].objects)
            elif t > 1 and seq[t - 2] == many and seq[t - 1] in colour_ids and seq[t] == objects_id:
                colour = COLOUR_NAMES[colour_ids.index(seq[t - 1])]
                n = sum(o.colour == colour for o in samples[row].objects)
            else:
                continue
            counts[row, t] = n if n < len(toy_task.NUMBERS) else -1
        start, turn = None, 0
        for t in range(len(seq)):
            if start is None and seq[max(0, t - len(marker)) : t] == marker:
                start = t
            if start is not None and seq[t] == tok.eos_token_id:
                labels[row, start : t + 1] = ids[row, start : t + 1]
                weights[row, start : t + 1] = 1.0 / (t + 1 - start)
                kinds[row, start : t + 1] = TURN_KINDS.index(toy_task.kind_of(turns[row][turn][0]))
                start, turn = None, turn + 1
    return {**batch, "labels": labels, "weights": weights, "kinds": kinds, "cells": cells,
            "colours": colours, "counts": counts}


def turn_loss(model, batch: dict[str, torch.Tensor], by_kind: dict[str, float] | None = None) -> torch.Tensor:
    """Next-token cross-entropy on the answer tokens, every answer weighted equally whatever its length (a
    one-word answer counts as much as a scene description) -> scalar. `by_kind`, when given, receives the mean
    loss of the answers of each kind in the batch (`TURN_KINDS`; floats, no gradient). An answer's loss is the
    mean over its tokens and its `</s>`, which is nearly free: guessing a yes/no answer scores ln(2)/2 = 0.35."""
    inputs = {k: v for k, v in batch.items() if k not in TRAINING_KEYS}
    logits = model(**inputs).logits[:, :-1].float()
    labels, weights = batch["labels"][:, 1:], batch["weights"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    if by_kind is not None:
        kinds, per_answer = batch["kinds"][:, 1:], (ce * weights).detach()
        for i, kind in enumerate(TURN_KINDS):
            if (mask := kinds == i).any():
                by_kind[kind] = float(per_answer[mask].sum() / weights[mask].sum())
    return (ce * weights).sum() / weights.sum()


@torch.inference_mode()
def answer(model, processor, samples: list[toy_task.Sample], batch_size: int = 50,
           max_new_tokens: int = 4) -> list[str]:
    """Greedy answers of `model` (Hugging Face `generate`) to `samples`, decoded and stripped."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        inputs = processor(images=[s.image for s in chunk], text=[chat_prompt(processor, s.question) for s in chunk],
                           padding=True, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = ids[:, inputs["input_ids"].shape[1]:]
        out += [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    model.train(was_training)
    return out


def accuracy(model, processor, samples: list[toy_task.Sample], batch_size: int = 50) -> tuple[float, dict]:
    """Exact-match accuracy of greedy answers over `samples` -> (overall, {kind: accuracy})."""
    got = answer(model, processor, samples, batch_size)
    right, total = Counter(), Counter()
    for s, a in zip(samples, got):
        total[s.kind] += 1
        right[s.kind] += a == s.answer
    return sum(right.values()) / len(samples), {k: right[k] / total[k] for k in toy_task.KINDS if total[k]}


def sincos_positions(side: int, dim: int) -> torch.Tensor:
    """2-D sine-cosine position codes of a `side` x `side` patch grid -> [side * side, dim] (row-major), half of
    the channels for the row and half for the column, frequencies from 1 to 1/100 cycles per patch."""
    quarter = dim // 4
    freq = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter - 1)))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angle = coord[:, None] * freq[None, :]
        parts += [angle.sin(), angle.cos()]
    codes = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(codes, (0, dim - codes.shape[1])).float()


def initial_positions(side: int, dim: int, image_size: int, cells: int = toy_task.GRID,
                      cell_scale: float = 3.0) -> torch.Tensor:
    """Initial position embeddings of a `side` x `side` patch grid -> [side * side, dim] (row-major): the 3x3
    cell a patch lies in, one-hot for its row in channels 0..cells-1 and its column in cells..2*cells-1 (times
    `cell_scale`), then 2-D sine-cosine codes of the patch position in the other channels."""
    codes = torch.zeros(side * side, dim)
    codes[:, 2 * cells:] = sincos_positions(side, dim - 2 * cells)
    patch = image_size / side
    for p in range(side * side):
        row, col = divmod(p, side)
        codes[p, int((row + 0.5) * patch * cells // image_size)] = cell_scale
        codes[p, cells + int((col + 0.5) * patch * cells // image_size)] = cell_scale
    return codes


def build(seed: int):
    """Untrained toy-vlm and its processor with a tokenizer trained on the task: seeded random weights, except
    that the vision tower's position embeddings start as codes of each patch's grid cell and position
    (`initial_positions`; the class position at zero), which shortens the plateau before the model learns to
    find a named cell."""
    from .builtins import BUILTINS, build_processor, build_tokenizer, random_model

    spec = dataclasses.replace(BUILTINS[BUILTIN], seed=seed)
    processor = build_processor(spec, build_tokenizer(spec.vocab, toy_task.corpus()))
    model = random_model(spec, processor)
    table = model.model.vision_tower.embeddings.position_embedding.weight
    with torch.no_grad():
        table.zero_()
        table[1:] = initial_positions(spec.image_size // spec.patch_size, table.shape[1], spec.image_size)
    matching_heads(model)
    return spec, model, processor


def matching_heads(model) -> None:
    """Start the first query head of every KV group of every text layer with its key projection equal to its
    query projection (in place). Such a head scores q.k = x W W^T y, which is large where x and y are alike:
    from the first step, a token that holds the words of a question ('red', 'circle') already leans towards
    the image tokens that the tied probe (`PatchProbe`) makes look like those words. With random key and
    query projections, finding an object by what it looks like was learned last, if at all."""
    cfg = model.config.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            attn = layer.self_attn
            for kv in range(cfg.num_key_value_heads):
                q = kv * group
                attn.k_proj.weight[kv * head_dim : (kv + 1) * head_dim] = \
                    attn.q_proj.weight[q * head_dim : (q + 1) * head_dim]


def extra_turns(sample: toy_task.Sample, k: int, rng: random.Random,
                describe: bool = True) -> list[tuple[str, str]]:
    """Up to `k` more (question, answer) turns about `sample`'s scene, drawn by `rng`, none repeating its own.

    With `describe`, the first is one of the scene descriptions `toy_task.DESCRIBE` or `toy_task.LOCATE`:
    dense supervision that ties position words to cells and objects to position words. The rest pick a
    question kind uniformly among the kinds the scene still has questions of, then a question of that kind:
    a scene has many more left-of pairs and attribute questions than where and count questions, and drawn
    from the pool as it comes those rarer kinds were learned last."""
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for kind, q, a in toy_task.scene_questions(sample.objects):
        if q != sample.question:
            by_kind.setdefault(kind, []).append((q, a))
    for pool in by_kind.values():
        rng.shuffle(pool)
    turns = []
    if describe and k:
        q = rng.choice((toy_task.DESCRIBE, toy_task.LOCATE))
        turns.append((q, toy_task.solve(sample.objects, q)))
    while len(turns) < k and (kinds := [kind for kind, pool in by_kind.items() if pool]):
        turns.append(by_kind[rng.choice(kinds)].pop())
    return turns


COLOUR_NAMES = tuple(toy_task.COLOURS)


def patch_labels(sample: toy_task.Sample, side: int) -> torch.Tensor:
    """What each image patch shows -> [side * side, 3] long (row-major patches): the colour, shape and size
    index + 1 of the object whose pixels the patch holds, 0 for a patch of plain background."""
    pixels = torch.from_numpy(np.array(sample.image)).reshape(side, -1, side, sample.image.width // side, 3)
    shown = (pixels != torch.tensor(toy_task.BACKGROUND, dtype=pixels.dtype)).any(-1).any(-1).any(1).reshape(-1)
    cells = patch_cells(side, sample.image.width)
    out = torch.zeros(side * side, 3, dtype=torch.long)
    for o in sample.objects:
        code = torch.tensor([COLOUR_NAMES.index(o.colour), toy_task.SHAPES.index(o.shape),
                             toy_task.SIZES.index(o.size)]) + 1
        out[(cells == o.cell) & shown] = code
    return out


def patch_cells(side: int, image_size: int) -> torch.Tensor:
    """The 3x3 grid cell (row-major) of each patch of a `side` x `side` grid -> [side * side] long."""
    centre = (torch.arange(side) + 0.5) * image_size / side
    rc = (centre * toy_task.GRID / image_size).long()
    return (rc[:, None] * toy_task.GRID + rc[None, :]).reshape(-1)


def word_ids(tokenizer, words) -> list[int]:
    """The token id of each of `words` as it follows a space in a question -> [len(words)]; each must be one token."""
    ids = [tokenizer(" " + w, add_special_tokens=False).input_ids for w in words]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the toy tokenizer must keep every attribute word one token, got {dict(zip(words, ids))}")
    return [i[0] for i in ids]


class PatchProbe(torch.nn.Module):
    """Read-outs of the projected image tokens (the text model's inputs) for the patch labels and the grid cell:
    an auxiliary loss that makes every image token say plainly what and where it shows. Only used in training;
    it does not ship with the model.

    The colour, shape and size heads are tied to the text model's word embeddings `embed`: the logit of
    'red' is the token's dot product with the embedding of ' red' (scaled, plus a bias; background has a
    vector of its own). An image token of a red circle thus comes to look like the words 'red' and 'circle',
    which `matching_heads` can find from a question that holds them. The cell head is a plain linear one."""

    HEADS = (len(toy_task.COLOURS) + 1, len(toy_task.SHAPES) + 1, len(toy_task.SIZES) + 1,
             toy_task.GRID * toy_task.GRID)

    def __init__(self, embed: torch.nn.Embedding, tokenizer):
        super().__init__()
        hidden = embed.weight.shape[1]
        self.embed = [embed]  # a list: the embedding stays the text model's, not a submodule of the probe
        self.ids = [word_ids(tokenizer, words) for words in (COLOUR_NAMES, toy_task.SHAPES, toy_task.SIZES)]
        self.background = torch.nn.Parameter(torch.zeros(3, hidden))
        self.bias = torch.nn.Parameter(torch.zeros(sum(self.HEADS[:3])))
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.cell = torch.nn.Linear(hidden, self.HEADS[3])

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, D], labels [B, N, 3], cells [N] -> mean cross-entropy of the four heads (scalar)."""
        targets = torch.cat([labels, cells.expand(labels.shape[0], -1)[..., None]], dim=-1)
        words = self.embed[0].weight
        logits = []
        for i, (ids, bias) in enumerate(zip(self.ids, self.bias.split(self.HEADS[:3]))):
            table = torch.cat([self.background[i : i + 1], words[ids]])
            logits.append(self.scale * tokens @ table.T + bias)
        logits.append(self.cell(tokens))
        return sum(torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), targets[..., i].reshape(-1))
                   for i, z in enumerate(logits)) / len(logits)


def thin(sample: toy_task.Sample, keep: int, rng: random.Random) -> toy_task.Sample:
    """`sample` with objects removed (in `rng` order) down to `keep`, never one that its answer depends on."""
    objects = list(sample.objects)
    order = list(objects)
    rng.shuffle(order)
    for o in order:
        if len(objects) <= keep:
            break
        rest = tuple(x for x in objects if x is not o)
        if toy_task.solve(rest, sample.question) == sample.answer:
            objects = list(rest)
    if len(objects) == len(sample.objects):
        return sample
    objects = tuple(objects)
    return dataclasses.replace(sample, image=toy_task.render(objects), objects=objects)


def curriculum_objects(step: int, steps: int, fraction: float) -> int:
    """The most objects per scene at `step`: 1 at the start, up to `MAX_OBJECTS` after `fraction` of the steps."""
    if fraction <= 0:
        return toy_task.MAX_OBJECTS
    return min(toy_task.MAX_OBJECTS, 1 + int(step / (fraction * steps) * toy_task.MAX_OBJECTS))


def lr_at(step: int, steps: int, warmup: int, peak: float, floor: float = 0.02) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `peak` down to `floor * peak` at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


class QuestionReadout(torch.nn.Module):
    """Read-outs from the text model's hidden states at the words a question is about (`encode_batch`'s targets):
    after layer `layer`, the grid cell of each object the question names by colour and shape (at the shape word)
    and, for a count question, the count (at the counted word); after layer `colour_layer`, at the same shape
    words, the colour named just before, through the word embeddings as `PatchProbe` reads it. Auxiliary losses
    that train the look-up of an object, and the count, where the question states them: a left-of question
    needs two look-ups and a comparison, and trained on the answer alone its loss never left chance. The colour
    read-out puts the colour word into the shape word's state in the form the image tokens show it, so that a
    look-up matches colour and shape, not shape alone. Only used in training; none of it ships."""

    def __init__(self, model, tokenizer, layer: int, colour_layer: int = 1):
        super().__init__()
        hidden = model.config.text_config.hidden_size
        self.cell = torch.nn.Linear(hidden, toy_task.GRID * toy_task.GRID)
        self.count = torch.nn.Linear(hidden, len(toy_task.NUMBERS))
        self.embed = [model.get_input_embeddings()]  # a list: the text model's embedding, not the read-out's
        self.colour_ids = word_ids(tokenizer, COLOUR_NAMES)
        self.colour_scale = torch.nn.Parameter(torch.tensor(1.0))
        self.hidden: dict[int, torch.Tensor] = {}
        layers = model.model.language_model.layers
        for at in {layer, colour_layer}:
            layers[at - 1].register_forward_hook(lambda module, inputs, output, at=at: self._keep(at, output))
        self.layer, self.colour_layer = layer, colour_layer

    def _keep(self, at: int, output):
        self.hidden[at] = output[0] if isinstance(output, tuple) else output

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`encode_batch`'s cells, colours, counts [B, T] (-1 where there is nothing to read) -> the mean
        cross-entropy (scalar; 0 when there is nothing to read) of each read-out, 'cell', 'colour' and 'count',
        on the latest forward pass's hidden states [B, T, D]."""
        words = self.embed[0].weight[self.colour_ids]
        heads = {"cell": (self.layer, self.cell, "cells"), "count": (self.layer, self.count, "counts"),
                 "colour": (self.colour_layer, lambda h: self.colour_scale * h @ words.T, "colours")}
        losses = {}
        for name, (at, head, key) in heads.items():
            hidden, target = self.hidden[at], batch[key]
            mask = target >= 0
            losses[name] = (torch.nn.functional.cross_entropy(head(hidden[mask]).float(), target[mask])
                            if mask.any() else hidden.sum() * 0.0)
        return losses


class _Projected:
    """Holds the projector's latest output, the image tokens [B, N, D] the text model reads."""

    def __init__(self, model):
        self.tokens = None
        model.model.multi_modal_projector.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.tokens = output
