"""The calibration set of `btp-calibrate`: a directory of images plus `prompts.jsonl`, or `builtin` scenes.

`builtin` draws scenes of the toy task (`btp.toy.task`: coloured shapes in a 3x3 grid) with a question about each,
deterministically from a seed, so that calibration runs anywhere without a download.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from btp.runtime.errors import DataError

PROMPTS = "prompts.jsonl"
PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Sample:
    """One calibration input: an RGB image, the user question and where it came from."""

    image: Image.Image
    prompt: str
    source: str


# --------------------------------------------------------------------------------------------- builtin
def builtin_samples(n: int, seed: int = 0, size: int = 96) -> list[Sample]:
    """`n` scenes of the toy task (`btp.toy.task`, the scenes `builtin:toy-vlm` learnt) with a question each,
    `size` x `size` pixels; never a scene and question of its test split. Sample i depends only on (seed, i), so
    smaller n gives a prefix."""
    from btp.toy import task

    if n < 1:
        raise DataError(f"builtin: expected at least 1 sample, got {n}")
    if size < 24:
        raise DataError(f"builtin: expected an image size of at least 24 pixels, got {size}")
    out = []
    for i in range(n):
        rng = random.Random(f"btp-calibration:{seed}:{i}")
        while True:
            objects, question, _ = task.draw_question(rng, rng.choice(task.KINDS))
            if not task.in_test_split(objects, question):
                break
        out.append(Sample(image=task.render(objects, size), prompt=question, source=f"builtin:{i + 1}"))
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
