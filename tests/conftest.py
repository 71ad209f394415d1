from concurrent.futures import ThreadPoolExecutor

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


# Small bounds keep the exported graphs and the tests quick.
LIMITS = dict(max_batch=4, max_prompt=256, max_new_tokens=64)


@pytest.fixture(scope="session")
def artifact(tmp_path_factory):
    """Factory: the compiled builtin:tiny-llava artifact for a preset, built once per session."""
    from btp.compiler.build import BuildConfig, compile_artifact
    from btp.compiler.export import Limits

    built = {}

    def get(preset: str):
        if preset not in built:
            out = tmp_path_factory.mktemp("artifacts") / preset
            cfg = BuildConfig(model="builtin:tiny-llava", plan=preset, out=out, backend="onnxruntime",
                              limits=Limits(**LIMITS))
            compile_artifact(cfg)
            built[preset] = out
        return built[preset]

    return get


@pytest.fixture(scope="session")
def assert_concurrent_calls_match_sequential():
    """The check as a fixture: tests/ is not a package, so a plain import would not resolve."""
    return _assert_concurrent_calls_match_sequential


def _assert_concurrent_calls_match_sequential(pipe, images):
    """4 threads each running 3 `generate` calls on one Pipeline give the tokens of running them one by one."""
    prompts = [["What is shown?", "Describe."], ["Where is the red circle?", "Hi"], ["Colours?", "Shapes?"]]
    expected = [pipe.generate(images, p, max_new_tokens=6).token_ids for p in prompts]

    def worker(_):
        return [pipe.generate(images, p, max_new_tokens=6).token_ids for p in prompts]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(worker, range(4)))
    assert all(r == expected for r in results)


@pytest.fixture(scope="session")
def tiny_qwen():
    """builtin:tiny-qwen2.5-vl in fp32 (shared; tests must not modify it)."""
    return load_model("builtin:tiny-qwen2.5-vl")
