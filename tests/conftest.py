import pytest
from PIL import Image

from btp.compiler import load_model
from btp.tools.samples import sample_image


@pytest.fixture(scope="session")
def tiny():
    """builtin:tiny-llava in fp32 (shared; tests must not modify it)."""
    return load_model("builtin:tiny-llava")


@pytest.fixture(scope="session")
def images():
    """Two different images: the bundled sample and a synthetic gradient."""
    grad = Image.linear_gradient("L").resize((48, 40)).convert("RGB")
    return [sample_image(), grad]
