"""The toy shapes task: deterministic, splits disjoint, answers read off the pixels, answers balanced."""

from collections import Counter

import numpy as np
import pytest

from btp.toy import task as toy_task
from btp.toy.task import (
    ANSWERS,
    BACKGROUND,
    COLOURS,
    GRID,
    IMAGE_SIZE,
    KINDS,
    TEST_SIZE,
    Object,
    make_sample,
    make_split,
    scene_questions,
    solve,
)


def _parse(image) -> tuple[Object, ...]:
    """Read the scene back from the pixels: per cell, the colour, the size from the extent, the shape from the
    fill of the bounding box and the widths of its top and bottom rows."""
    pixels = np.asarray(image)
    names = {v: k for k, v in COLOURS.items()}
    cell = IMAGE_SIZE // GRID
    found = []
    for c in range(GRID * GRID):
        row, col = divmod(c, GRID)
        block = pixels[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
        ink = np.any(block != BACKGROUND, axis=-1)
        if not ink.any():
            continue
        colours = {tuple(int(v) for v in p) for p in block[ink]}
        assert len(colours) == 1, f"cell {c} has {colours}"
        ys, xs = np.nonzero(ink)
        box = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        extent = max(box.shape)
        fill = box.mean()
        top, bottom = box[0].sum(), box[-1].sum()
        if bottom > 2 * top + 2:
            shape = "triangle"
        elif fill > 0.9:
            shape = "square"
        elif fill > 0.67:
            shape = "circle"
        else:
            shape = "cross"
        found.append(Object(c, shape, names[colours.pop()], "large" if extent > 0.65 * cell else "small"))
    return tuple(found)


def _plain(objects):
    return tuple((o.cell, o.shape, o.colour, o.size) for o in objects)


def test_samples_are_deterministic_and_prefixes():
    a, b = make_split("train", 12), make_split("train", 6)
    again = [make_sample("train", i) for i in range(6)]
    for x, y, z in zip(a, b, again):
        assert x.question == y.question == z.question and x.answer == y.answer == z.answer
        assert x.image.tobytes() == y.image.tobytes() == z.image.tobytes()
    assert [s.kind for s in a] == [KINDS[i % len(KINDS)] for i in range(12)]
    assert all(s.image.size == (IMAGE_SIZE, IMAGE_SIZE) and s.image.mode == "RGB" for s in a)


def test_test_split_is_fixed_and_disjoint_from_train():
    test = make_split("test")
    assert len(test) == TEST_SIZE
    train = make_split("train", 2000)
    test_keys = {(s.objects, s.question) for s in test}
    assert not test_keys & {(s.objects, s.question) for s in train}
    assert not {s.image.tobytes() for s in test} & {s.image.tobytes() for s in train[:500]}
    with pytest.raises(ValueError, match="500 samples"):
        make_split("test", TEST_SIZE + 1)
    with pytest.raises(ValueError, match="split must be one of"):
        make_sample("val", 0)


def test_answers_follow_from_the_pixels():
    for s in make_split("train", 600) + make_split("test", 120):
        scene = _parse(s.image)
        assert _plain(scene) == _plain(s.objects)
        assert solve(scene, s.question) == s.answer, (s.question, s.answer, scene)


def test_descriptions_list_every_object_in_cell_order():
    objects = (Object(0, "circle", "red", "small"), Object(4, "square", "blue", "large"))
    assert solve(objects, toy_task.DESCRIBE) == "top left red small circle, center blue large square"
    assert solve(objects, toy_task.LOCATE) == "red small circle top left, blue large square center"
    assert solve(objects, "What shape is the object at the top right?") is None
    with pytest.raises(ValueError, match="not a toy-task question"):
        solve(objects, "Why?")


def test_scene_questions_are_answered_by_the_scene():
    for s in make_split("train", 60):
        asked = scene_questions(s.objects)
        assert (s.kind, s.question, s.answer) in asked
        assert all(a in ANSWERS[k] and solve(s.objects, q) == a for k, q, a in asked)


def test_every_question_names_its_kind():
    for s in make_split("train", 60):
        assert toy_task.kind_of(s.question) == s.kind
        assert all(toy_task.kind_of(q) == k for k, q, _ in scene_questions(s.objects))
    assert toy_task.kind_of(toy_task.DESCRIBE) == toy_task.kind_of(toy_task.LOCATE) == "describe"
    with pytest.raises(ValueError, match="not a toy-task question"):
        toy_task.kind_of("Why?")


def test_answers_are_balanced_within_each_kind():
    samples = make_split("train", 3000)
    by_kind = {k: Counter(s.answer for s in samples if s.kind == k) for k in KINDS}
    for kind, counts in by_kind.items():
        assert set(counts) == set(ANSWERS[kind]), kind
        expected = sum(counts.values()) / len(ANSWERS[kind])
        assert all(abs(n - expected) < 0.4 * expected for n in counts.values()), (kind, counts)
    test = Counter(s.kind for s in make_split("test"))
    assert max(test.values()) - min(test.values()) <= 1


def test_corpus_covers_every_question_and_answer_word():
    words = {w for line in toy_task.corpus() for w in line.replace("?", " ").split()}
    for s in make_split("test", 60):
        assert set(s.question.replace("?", " ").split()) <= words
        assert set(s.answer.split()) <= words
