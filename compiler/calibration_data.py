"""The calibration set of `btp-calibrate`: a directory of images plus `prompts.jsonl`, or `builtin` scenes.

`builtin` draws text-free synthetic scenes (coloured shapes on a plain or two-tone background) with a question
built from each scene, deterministically from a seed, so that calibration runs anywhere without a download.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from btp.runtime.errors import DataError

PROMPTS = "prompts.jsonl"
PLACEHOLDER = "<image>"

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "orange": (245, 140, 30), "purple": (140, 60, 190), "pink": (240, 120, 180), "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond")
PLURAL = {"cross": "crosses"}
GRID = 3
POSITIONS = ("top left", "top middle", "top right", "middle left", "centre", "middle right",
             "bottom left", "bottom middle", "bottom right")
RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Sample:
    """One calibration input: an RGB image, the user question and where it came from."""

    image: Image.Image
    prompt: str
    source: str


@dataclass(frozen=True)
class _Obj:
    shape: str
    colour: str
    cell: int  # index into POSITIONS, row-major on the GRID x GRID grid


# --------------------------------------------------------------------------------------------- builtin
def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, round(r / 3)))
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        t = r / 3
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:  # star
        pts = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(pts, fill=fill)


def _scene(rng: random.Random, size: int) -> tuple[Image.Image, list[_Obj]]:
    grey = rng.randint(70, 210)
    tone = tuple(grey + rng.randint(-18, 18) for _ in range(3))  # a neutral, slightly tinted background
    image = Image.new("RGB", (size, size), tone)
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:  # two-tone: the second half a darker or lighter neutral
        delta = -70 if grey > 140 else 60
        other = tuple(c + delta for c in tone)
        split = rng.randint(size // 3, 2 * size // 3)
        draw.rectangle((0, split, size, size) if rng.random() < 0.5 else (split, 0, size, size), fill=other)
    cell = size / GRID
    objs = [_Obj(rng.choice(SHAPES), colour, c)
            for colour, c in zip(rng.sample(sorted(COLOURS), rng.randint(1, 6)), rng.sample(range(GRID * GRID), 6))]
    for o in objs:
        r = cell * rng.uniform(0.22, 0.42)
        jitter = cell / 2 - r
        cx = (o.cell % GRID + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (o.cell // GRID + 0.5) * cell + rng.uniform(-jitter, jitter)
        _draw(draw, o.shape, cx, cy, r, COLOURS[o.colour])
    return image, objs


def _question(rng: random.Random, objs: list[_Obj]) -> str:
    a = rng.choice(objs)
    shape = rng.choice([o.shape for o in objs] + [rng.choice(SHAPES)])
    options = [
        lambda: rng.choice(("Describe the image.", "What do you see in this picture?", "Describe the scene briefly.")),
        lambda: f"What colour is the object in the {POSITIONS[a.cell]}?",
        lambda: f"How many {PLURAL.get(shape, shape + 's')} are there?",
        lambda: "How many objects are in the image?",
        lambda: f"Where is the {a.colour} {a.shape}?",
        lambda: f"What shape is the {a.colour} object?",
        lambda: f"Is there a {rng.choice(sorted(COLOURS))} {shape} in the image?",
        lambda: "List the colours of the shapes from left to right.",
    ]
    if len(objs) >= 2:
        b = rng.choice([o for o in objs if o is not a])
        options.append(lambda: f"Is there a {a.colour} {a.shape} {rng.choice(RELATIONS)} the {b.colour} {b.shape}?")
        options.append(lambda: f"Is the {a.colour} {a.shape} bigger than the {b.colour} {b.shape}?")
    return rng.choice(options)()


def builtin_samples(n: int, seed: int = 0, size: int = 96) -> list[Sample]:
    """`n` synthetic scenes with questions; sample i depends only on (seed, i), so smaller n gives a prefix."""
    if n < 1:
        raise DataError(f"builtin: expected at least 1 sample, got {n}")
    if size < 24:
        raise DataError(f"builtin: expected an image size of at least 24 pixels, got {size}")
    out = []
    for i in range(n):
        rng = random.Random(f"btp-calibration:{seed}:{i}")
        image, objs = _scene(rng, size)
        out.append(Sample(image=image, prompt=_question(rng, objs), source=f"builtin:{i + 1}"))
    return out


# --------------------------------------------------------------------------------------------- directory
def _one_line(x: object) -> str:
    return " ".join(str(x).split())


def _load_image(path: Path, where: str) -> Image.Image:
    if not path.is_file():
        raise DataError(f"{where}: image {str(path)!r} not found")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() loads the pixels, so the file is closed on return
    except (Image.UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as e:
        raise DataError(f"{where}: image {str(path)!r} cannot be read: {_one_line(e)}") from None


def _entry(raw: bytes, where: str) -> tuple[str, str]:
    try:
        obj = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise DataError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f'{where}: expected an object {{"image": ..., "prompt": ...}}, got {type(obj).__name__}')
    for key in ("image", "prompt"):
        if key not in obj:
            raise DataError(f"{where}: missing key {key!r}")
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    if not obj["image"].strip():
        raise DataError(f"{where}: 'image' is empty")
    if not obj["prompt"].strip():
        raise DataError(f"{where}: 'prompt' is empty")
    if (count := obj["prompt"].count(PLACEHOLDER)) > 1:
        raise DataError(f"{where}: prompt holds {count} {PLACEHOLDER} placeholders, expected at most 1")
    return obj["image"], obj["prompt"]


def load_samples(spec: str, n: int = 64, seed: int = 0) -> list[Sample]:
    """`builtin` scenes, or the first `n` entries of DIR/prompts.jsonl (lines after those are not read)."""
    if n < 1:
        raise DataError(f"{spec}: expected at least 1 sample, got {n}")
    if spec == "builtin":
        return builtin_samples(n, seed)
    root = Path(spec)
    if not root.is_dir():
        raise DataError(f"{spec}: calibration data directory not found (expected a directory or 'builtin')")
    index = root / PROMPTS
    if not index.is_file():
        raise DataError(f'{index}: not found (expected one JSON object per line: {{"image": ..., "prompt": ...}})')
    try:
        data = index.read_bytes()
    except OSError as e:
        raise DataError(f"{index}: cannot be read: {_one_line(e)}") from None
    out: list[Sample] = []
    for line, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{index}:{line}"
        name, prompt = _entry(raw, where)
        out.append(Sample(image=_load_image(root / name, where), prompt=prompt, source=where))
        if len(out) == n:
            break
    if not out:
        raise DataError(f"{index}: no samples (the file holds no non-blank line)")
    return out


def split(samples: list[Sample], heldout: float = 0.25) -> tuple[list[Sample], list[Sample]]:
    """(calibration, held-out): the last `heldout` share held out, at least 1 of each when there are 2 or more."""
    if not 0.0 < heldout < 1.0:
        raise DataError(f"held-out share must lie strictly between 0 and 1, got {heldout}")
    total = len(samples)
    if total < 2:
        return list(samples), []
    k = min(total - 1, max(1, int(total * heldout + 0.5)))
    return list(samples[: total - k]), list(samples[total - k :])
