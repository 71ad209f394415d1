"""A synthetic visual-question task for `builtin:toy-vlm`: shapes in a 3x3 grid, one- or two-word answers.

Each scene has a few objects (a shape in a colour and a size) in distinct cells of a 3x3 grid on a plain
dark background. Questions need one region ("What colour is the object at the top left?"), one object
found anywhere ("Where is the blue square?"), two objects ("Is there a red circle left of the green
square?") or the whole scene ("How many circles are there?"). A sample is drawn answer first, so answers
are balanced within each question kind by construction.

Sample `i` of a split depends only on (split, i): `make_split(split, n)` for a smaller `n` is a prefix. The
test split is a fixed 500 samples; the train split skips any scene and question the test split holds.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw

IMAGE_SIZE = 72
GRID = 3
BACKGROUND = (24, 24, 24)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 100, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES = ("small", "large")
RADIUS = {"small": 0.24, "large": 0.42}  # half the object's extent, as a fraction of the cell side
ROWS = ("top", "middle", "bottom")
COLS = ("left", "middle", "right")
NUMBERS = ("zero", "one", "two", "three")
KINDS = ("colour", "shape", "size", "where", "count", "left_of")
MIN_OBJECTS, MAX_OBJECTS = 3, 6
TEST_SIZE = 500
SPLITS = ("train", "test")


def position_name(cell: int) -> str:
    """Cell index (row-major in the 3x3 grid) -> its name: 'top left', ..., 'center', ..., 'bottom right'."""
    row, col = divmod(cell, GRID)
    return "center" if (row, col) == (1, 1) else f"{ROWS[row]} {COLS[col]}"


POSITIONS = tuple(position_name(c) for c in range(GRID * GRID))
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": SIZES,
    "where": POSITIONS,
    "count": NUMBERS,
    "left_of": ("yes", "no"),
}


@dataclass(frozen=True)
class Object:
    """One object, centred in its grid cell (row-major index): shape, colour, size."""

    cell: int
    shape: str
    colour: str
    size: str


@dataclass(frozen=True)
class Sample:
    """One question about one image; `kind` is one of `KINDS`, `objects` the scene the image shows."""

    image: Image.Image
    question: str
    answer: str
    kind: str = ""
    objects: tuple[Object, ...] = ()


# ------------------------------------------------------------------------------------------------ drawing
def render(objects: tuple[Object, ...], size: int = IMAGE_SIZE) -> Image.Image:
    """Draw `objects` on the plain background -> RGB image `size` x `size` (no anti-aliasing: exact colours)."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size / GRID
    for o in objects:
        row, col = divmod(o.cell, GRID)
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        r = RADIUS[o.size] * cell
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            s = 0.85 * r  # a square of the same area impression as the circle
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
        else:  # cross
            t = r / 3
            draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
            draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    return image


# ------------------------------------------------------------------------------------------------ scenes
def _object(rng: random.Random, cell: int, shape: str | None = None, colour: str | None = None,
            size: str | None = None) -> Object:
    return Object(cell, shape or rng.choice(SHAPES), colour or rng.choice(tuple(COLOURS)),
                  size or rng.choice(SIZES))


def _fill(rng: random.Random, fixed: list[Object], allowed, minimum: int = MIN_OBJECTS) -> tuple[Object, ...]:
    """`fixed` plus random objects in free cells for which `allowed(object)` holds, 3..6 objects in all."""
    total = rng.randint(max(minimum, len(fixed)), MAX_OBJECTS)
    used = {o.cell for o in fixed}
    free = [c for c in range(GRID * GRID) if c not in used]
    rng.shuffle(free)
    objects = list(fixed)
    for cell in free[: total - len(fixed)]:
        while not allowed(o := _object(rng, cell)):
            pass
        objects.append(o)
    return tuple(sorted(objects, key=lambda o: o.cell))


def _attribute_question(rng: random.Random, kind: str) -> tuple[tuple[Object, ...], str, str]:
    answer = rng.choice(ANSWERS[kind])
    cell = rng.randrange(GRID * GRID)
    target = _object(rng, cell, **{kind: answer})
    objects = _fill(rng, [target], lambda o: True)
    question = {
        "colour": "What colour is the object at the {}?",
        "shape": "What shape is the object at the {}?",
        "size": "What size is the object at the {}?",
    }[kind].format(position_name(cell))
    return objects, question, answer


def _where_question(rng: random.Random) -> tuple[tuple[Object, ...], str, str]:
    cell = rng.randrange(GRID * GRID)
    target = _object(rng, cell)
    objects = _fill(rng, [target], lambda o: (o.shape, o.colour) != (target.shape, target.colour))
    return objects, f"Where is the {target.colour} {target.shape}?", position_name(cell)


def _count_question(rng: random.Random) -> tuple[tuple[Object, ...], str, str]:
    k = rng.randrange(len(NUMBERS))
    cells = rng.sample(range(GRID * GRID), k)
    if rng.random() < 0.5:
        shape = rng.choice(SHAPES)
        fixed = [_object(rng, c, shape=shape) for c in cells]
        objects = _fill(rng, fixed, lambda o: o.shape != shape)
        question = f"How many {PLURALS[shape]} are there?"
    else:
        colour = rng.choice(tuple(COLOURS))
        fixed = [_object(rng, c, colour=colour) for c in cells]
        objects = _fill(rng, fixed, lambda o: o.colour != colour)
        question = f"How many {colour} objects are there?"
    return objects, question, NUMBERS[k]


def _left_of_question(rng: random.Random) -> tuple[tuple[Object, ...], str, str]:
    answer = rng.choice(ANSWERS["left_of"])
    while True:
        a_cell, b_cell = rng.sample(range(GRID * GRID), 2)
        if (a_cell % GRID < b_cell % GRID) == (answer == "yes"):
            break
    a = _object(rng, a_cell)
    while (b := _object(rng, b_cell)).shape == a.shape and b.colour == a.colour:
        pass
    pairs = {(a.shape, a.colour), (b.shape, b.colour)}
    objects = _fill(rng, [a, b], lambda o: (o.shape, o.colour) not in pairs)
    return objects, f"Is there a {a.colour} {a.shape} left of the {b.colour} {b.shape}?", answer


# ------------------------------------------------------------------------------------------------ oracle
_QUESTIONS = [
    (re.compile(r"What (colour|shape|size) is the object at the (.+)\?"), "attribute"),
    (re.compile(r"Where is the (\w+) (\w+)\?"), "where"),
    (re.compile(r"How many (\w+) are there\?"), "count_shape"),
    (re.compile(r"How many (\w+) objects are there\?"), "count_colour"),
    (re.compile(r"Is there a (\w+) (\w+) left of the (\w+) (\w+)\?"), "left_of"),
]


DESCRIBE = "Describe the scene."
LOCATE = "Where is each object?"


def describe(objects: tuple[Object, ...]) -> str:
    """Every object cell by cell (row-major): 'top left red small circle, center blue large square'."""
    return ", ".join(f"{position_name(o.cell)} {o.colour} {o.size} {o.shape}" for o in sorted(objects,
                                                                                          key=lambda o: o.cell))


def locate(objects: tuple[Object, ...]) -> str:
    """Every object then its cell (row-major): 'red small circle top left, blue large square center'."""
    return ", ".join(f"{o.colour} {o.size} {o.shape} {position_name(o.cell)}" for o in sorted(objects,
                                                                                         key=lambda o: o.cell))


def _parse(question: str) -> tuple[str, re.Match]:
    """The form of a task question (`_QUESTIONS`) and its match; ValueError for anything else."""
    for pattern, form in _QUESTIONS:
        if m := pattern.fullmatch(question):
            return form, m
    raise ValueError(f"not a toy-task question: {question!r}")


def solve(objects: tuple[Object, ...], question: str) -> str | None:
    """The answer to `question` about the scene `objects`, or None when the scene does not fix one
    (an empty cell, an object that is missing or not unique, a count above three)."""
    if question == DESCRIBE:
        return describe(objects)
    if question == LOCATE:
        return locate(objects)
    form, m = _parse(question)

    def find(colour, shape):
        found = [o for o in objects if (o.colour, o.shape) == (colour, shape)]
        return found[0] if len(found) == 1 else None

    if form == "attribute":
        attribute, pos = m.groups()
        hit = [o for o in objects if position_name(o.cell) == pos]
        return getattr(hit[0], attribute) if hit else None
    if form == "where":
        o = find(*m.groups())
        return position_name(o.cell) if o else None
    if form in ("count_shape", "count_colour"):
        word = m.group(1)
        if form == "count_shape":
            n = sum(PLURALS[o.shape] == word for o in objects)
        else:
            n = sum(o.colour == word for o in objects)
        return NUMBERS[n] if n < len(NUMBERS) else None
    a, b = find(*m.groups()[:2]), find(*m.groups()[2:])
    if a is None or b is None or a is b:
        return None
    return "yes" if a.cell % GRID < b.cell % GRID else "no"


def kind_of(question: str) -> str:
    """The kind (one of `KINDS`) of a task question, 'describe' for `DESCRIBE` and `LOCATE`."""
    if question in (DESCRIBE, LOCATE):
        return "describe"
    form, m = _parse(question)
    return m.group(1) if form == "attribute" else "count" if form.startswith("count") else form


def scene_questions(objects: tuple[Object, ...]) -> list[tuple[str, str, str]]:
    """Every question of the task that the scene `objects` answers -> [(kind, question, answer)]."""
    out = []
    for o in objects:
        pos = position_name(o.cell)
        out += [(k, f"What {k} is the object at the {pos}?", getattr(o, k)) for k in ("colour", "shape", "size")]
    pairs = Counter((o.colour, o.shape) for o in objects)
    unique = [o for o in objects if pairs[(o.colour, o.shape)] == 1]
    out += [("where", f"Where is the {o.colour} {o.shape}?", position_name(o.cell)) for o in unique]
    counts = [f"How many {PLURALS[s]} are there?" for s in SHAPES]
    counts += [f"How many {c} objects are there?" for c in COLOURS]
    out += [("count", q, a) for q in counts if (a := solve(objects, q)) is not None]
    for a in unique:
        for b in unique:
            if a is not b:
                q = f"Is there a {a.colour} {a.shape} left of the {b.colour} {b.shape}?"
                out.append(("left_of", q, solve(objects, q)))
    return out


def make_sample(split: str, index: int) -> Sample:
    """Sample `index` of `split` ('train' or 'test'); deterministic in (split, index), kinds in rotation."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    kind = KINDS[index % len(KINDS)]
    objects, question, answer = draw_question(random.Random(f"btp-toy-vlm:{split}:{index}"), kind)
    return Sample(render(objects), question, answer, kind, objects)


def draw_question(rng: random.Random, kind: str) -> tuple[tuple[Object, ...], str, str]:
    """A scene, a question of `kind` (one of `KINDS`) about it and its answer, drawn from `rng`."""
    if kind in ("colour", "shape", "size"):
        return _attribute_question(rng, kind)
    if kind == "where":
        return _where_question(rng)
    if kind == "count":
        return _count_question(rng)
    if kind == "left_of":
        return _left_of_question(rng)
    raise ValueError(f"question kind: expected one of {KINDS}, got {kind!r}")


def in_test_split(objects: tuple[Object, ...], question: str) -> bool:
    """Whether the fixed test split holds this scene with this question (training and calibration skip it)."""
    return (objects, question) in _test_keys()


@lru_cache(maxsize=1)
def _test_keys() -> frozenset:
    return frozenset((s.objects, s.question) for s in (make_sample("test", i) for i in range(TEST_SIZE)))


def iter_split(split: str, n: int | None = None) -> Iterator[Sample]:
    """The first `n` samples of `split` (all of them for the test split when `n` is None), lazily.

    The train split is endless (`n` None) and leaves out any (scene, question) of the test split.
    """
    if split == "test":
        n = TEST_SIZE if n is None else n
        if not 0 <= n <= TEST_SIZE:
            raise ValueError(f"the test split has {TEST_SIZE} samples, asked for {n}")
        yield from (make_sample("test", i) for i in range(n))
        return
    index = count = 0
    while n is None or count < n:
        sample = make_sample(split, index)
        index += 1
        if in_test_split(sample.objects, sample.question):
            continue
        count += 1
        yield sample


def make_split(split: str, n: int | None = None) -> list[Sample]:
    """`n` samples of `split` as a list (the whole fixed test split when `n` is None)."""
    if split == "train" and n is None:
        raise ValueError("the train split is endless: pass n")
    return list(iter_split(split, n))


def corpus() -> list[str]:
    """Every question template with every word it can hold, and every answer: text for training a tokenizer."""
    lines = []
    for pos in POSITIONS:
        lines += [f"What {a} is the object at the {pos}?" for a in ("colour", "shape", "size")]
    for colour in COLOURS:
        lines.append(f"How many {colour} objects are there?")
        for shape in SHAPES:
            lines.append(f"Where is the {colour} {shape}?")
            lines.append(f"Is there a {colour} {shape} left of the {colour} {shape}?")
    lines += [f"How many {PLURALS[s]} are there?" for s in SHAPES]
    answers = [a for kind in KINDS for a in ANSWERS[kind]]
    lines = [f"USER: {q} ASSISTANT: {a}" for q in lines for a in answers]
    scenes = [(Object(c, s, colour, size),) for c in range(GRID * GRID) for s in SHAPES for colour in COLOURS
              for size in SIZES]
    return lines + [f"USER: {q} ASSISTANT: {solve(o, q)}" for o in scenes for q in (DESCRIBE, LOCATE)]
