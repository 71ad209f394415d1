"""The other two presets' compiled builtin:tiny-qwen2.5-vl artifacts (fastv, pdrop) against the reference, as
test_qwen_artifact.py checks divprune and btp: a file of their own so that a second test worker compiles them."""

import pytest
from test_qwen_artifact import LIMITS, check_pruned_artifact

from btp.compiler.build import BuildConfig, compile_artifact


@pytest.mark.parametrize("preset", ["fastv", "pdrop"])
def test_pruned_presets_give_the_reference_tokens_and_kept_indices(tmp_path, tiny_qwen, preset):
    root = tmp_path / preset
    compile_artifact(BuildConfig(model="builtin:tiny-qwen2.5-vl", plan=preset, out=root, backend="onnxruntime",
                                 limits=LIMITS))
    check_pruned_artifact(root, tiny_qwen, preset)
