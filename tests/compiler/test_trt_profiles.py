"""TensorRT profiles are derived from the manifest's I/O specs; TensorRT itself is tested where it exists."""

import importlib.util

import pytest

from btp.artifact.manifest import read_manifest
from btp.compiler.trt_profiles import manifest_profiles
from btp.runtime import ArtifactError, Pipeline

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def manifest(artifact):
    return read_manifest(artifact("btp"))


def _bounds(m):
    from types import SimpleNamespace

    return SimpleNamespace(**vars(m.build.bounds), image_tokens=m.chain.image_tokens)


def test_stage_graphs_get_prefill_and_decode_profiles_with_their_own_lengths(manifest):
    bounds = _bounds(manifest)
    for st in manifest.chain.model_dump()["stages"]:
        prefill, decode = manifest_profiles(manifest, st["name"])
        longest = bounds.max_prompt - bounds.image_tokens + st["image_tokens"]
        assert prefill["inputs_embeds"][2][1] == longest and prefill["inputs_embeds"][2][0] == bounds.max_batch
        key = f"past_key_values.{st['layers'][0]}.key"
        assert prefill[key][0][2] == prefill[key][2][2] == 0  # prefill: empty past
        assert decode["inputs_embeds"][0][1] == decode["inputs_embeds"][2][1] == 1  # decode: one token
        assert decode[key][2][2] == longest + bounds.max_new_tokens - 1
        for p in (prefill, decode):  # the mask spans past + new tokens in every profile
            assert [a + b for a, b in zip(p[key][2][2:3], p["inputs_embeds"][2][1:2])] == [p["attention_mask"][2][1]]


def test_prune_and_embed_profiles(manifest):
    bounds = _bounds(manifest)
    (prune,) = manifest_profiles(manifest, "prune2")
    assert prune["hidden_states"][0][1] == 33  # at least the 32 image tokens alive plus one text token
    assert prune["image_start"] == ([1], [1], [bounds.max_batch])
    prefill, decode = manifest_profiles(manifest, "embed")
    assert prefill["image_features"][2][1] == 64 and decode["image_features"][2][1] == 0


def test_tensorrt_backend_refuses_an_artifact_without_engines(artifact):
    with pytest.raises(ArtifactError, match="backend tensorrt"):
        Pipeline.load(artifact("btp"), backend="tensorrt")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="tensorrt is not importable here (it needs an NVIDIA GPU host)")
def test_tensorrt_engines_match_onnxruntime(tmp_path, images):  # pragma: no cover - GPU hosts only
    from btp.compiler.build import BuildConfig, compile_artifact
    from btp.compiler.export import Limits

    out = tmp_path / "trt"
    compile_artifact(BuildConfig(model="builtin:tiny-llava", plan="btp", out=out, backend="tensorrt",
                                 limits=Limits(max_prompt=256, max_new_tokens=16)))
    trt_pipe, ort_pipe = Pipeline.load(out, backend="tensorrt"), Pipeline.load(out, backend="onnxruntime")
    a = trt_pipe.generate(images, ["What is shown?", "Describe it."], max_new_tokens=8)
    b = ort_pipe.generate(images, ["What is shown?", "Describe it."], max_new_tokens=8)
    assert a.token_ids == b.token_ids and a.kept_indices == b.kept_indices
