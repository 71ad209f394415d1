"""Bundled sample inputs for demos and tests."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from PIL import Image

SAMPLE_QUESTION = "What is shown in the image?"

# `make demo` and `btp-demo`: a test-split scene of the toy task, a question about it and its right answer.
TOY_QUESTION = "Where is the white circle?"
TOY_ANSWER = "bottom left"


def _open(name: str) -> Image.Image:
    with resources.files("btp.tools").joinpath(f"data/{name}").open("rb") as f:
        return Image.open(f).convert("RGB")


def sample_image() -> Image.Image:
    """The bundled 128x128 RGB sample: four coloured shapes on a light background."""
    return _open("sample.png")


def toy_scene() -> Image.Image:
    """The bundled 72x72 scene of the toy shapes task (six objects, two of them white): `TOY_QUESTION` about
    it has the answer `TOY_ANSWER`."""
    return _open("toy-scene.png")


def toy_plan_path() -> Path:
    """The demo's plan for `builtin:toy-vlm`: diversity keeps 20 of 81 image tokens before the text model,
    attention keeps 13 from layer 4 on (21.8% of the image tokens, layer-averaged)."""
    return Path(str(resources.files("btp.tools").joinpath("data/toy-vlm-plan.json")))
