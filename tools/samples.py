"""Bundled sample inputs for demos and tests."""

from __future__ import annotations

from importlib import resources

from PIL import Image

SAMPLE_QUESTION = "What is shown in the image?"


def sample_image() -> Image.Image:
    """The bundled 128x128 RGB sample: four coloured shapes on a light background."""
    with resources.files("btp.tools").joinpath("data/sample.png").open("rb") as f:
        return Image.open(f).convert("RGB")
