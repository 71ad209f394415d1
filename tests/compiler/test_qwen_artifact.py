"""Compiled builtin:tiny-qwen2.5-vl artifacts: image-token bounds, the processor saved without torchvision, every
exported graph against its torch module, the ONNX Runtime pipeline against the reference on three image sizes with
one artifact (plan none, and the pruned presets divprune and btp), and btp-check."""

import json
import re
import shutil

import numpy as np
import onnx
import pytest
from PIL import Image

from btp.artifact.manifest import MANIFEST, read_manifest
from btp.artifact.processor import PARTS, load_processor, save_processor
from btp.cli import check as check_cli
from btp.cli import compile as compile_cli
from btp.compiler import reference_pipeline
from btp.compiler.build import BuildConfig, compile_artifact, image_bounds
from btp.compiler.export import Limits
from btp.compiler.families import FAMILIES
from btp.compiler.trt_lint import lint_model
from btp.compiler.trt_profiles import manifest_profiles
from btp.runtime import Pipeline
from btp.runtime.errors import ArtifactError, BuildError
from btp.tools.check import capture_feeds, compare_graph

LIMITS = Limits(max_batch=2, max_prompt=160, max_new_tokens=16)
SIDES = {4: 56, 16: 112, 64: 224}  # image tokens -> the square image's side in pixels (28 pixels a token)
PROMPTS = ["What is shown?", "Describe the colours and the shapes you see."]
STEPS = 12


def _image(side: int, seed: int = 0) -> Image.Image:
    """Seeded noise over a gradient: no two patches alike, so no selection among them is a tie."""
    noise = np.random.default_rng(seed).integers(0, 96, (side, side, 3))
    ramp = np.linspace(0, 159, side)[None, :, None]
    return Image.fromarray((noise + ramp).astype(np.uint8))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Factory: the builtin:tiny-qwen2.5-vl artifact of a preset, compiled once per module."""
    built = {}

    def get(preset: str):
        if preset not in built:
            out = tmp_path_factory.mktemp("qwen") / preset
            compile_artifact(BuildConfig(model="builtin:tiny-qwen2.5-vl", plan=preset, out=out, backend="onnxruntime",
                                         limits=LIMITS))
            built[preset] = out
        return built[preset]

    return get


@pytest.fixture(scope="module")
def qwen_artifact(compiled):
    return compiled("none")


@pytest.fixture(scope="module")
def reference(tiny_qwen, qwen_artifact):
    ref = reference_pipeline(tiny_qwen, "none", max_positions=LIMITS.max_positions)
    ref.processor = load_processor(qwen_artifact / "processor")
    return ref


def test_manifest_records_the_image_token_bounds_and_the_profiles_span_them(qwen_artifact):
    manifest = read_manifest(qwen_artifact)
    b = manifest.build
    assert (b.min_image_tokens, b.max_image_tokens) == (4, 64)  # the processor's own bounds
    assert manifest.build.bounds.max_image_tokens == 64 and manifest.chain.family == "qwen2_5_vl"
    saved = json.loads((qwen_artifact / "processor" / "preprocessor_config.json").read_text())
    assert saved["size"] == {"shortest_edge": 4 * 28 * 28, "longest_edge": 64 * 28 * 28}  # pixels of 4..64 tokens
    (vision,) = manifest_profiles(manifest, "vision")
    assert vision["window_index"] == ([4], [32], [64])
    assert vision["pixel_values"] == ([1, 16, 1176], [1, 128, 1176], [2, 256, 1176])
    prefill, decode = manifest_profiles(manifest, "embed")
    assert prefill["image_features"] == ([1, 4, 64], [1, 32, 64], [2, 64, 64])
    assert decode["image_features"][2] == [2, 0, 64]
    stage_prefill, _ = manifest_profiles(manifest, "stage0")
    assert stage_prefill["position_ids"][2] == [3, 2, 160]
    for name, info in manifest.graphs.items():
        model = onnx.load(str(qwen_artifact / info.file), load_external_data=False)
        declared = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                    for v in model.graph.input}
        assert all(declared[t.name] == t.shape for t in info.inputs), name
        assert lint_model(qwen_artifact / info.file) == [], name  # what TensorRT's parser would reject


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["build"].update(min_image_tokens=65), r"build image tokens 65..64: expected 0..0"),
    (lambda d: d["build"].update(max_image_tokens=160), r"1 <= min <= max < max_prompt \(160\)"),
    (lambda d: d["chain"].update(window_tokens="3"), "chain window_tokens: expected int, found '3'"),
    (lambda d: d["chain"].update(colour=1), r"unknown chain field\(s\) \['colour'\]"),
    (lambda d: d["chain"].update(family="gemma3"),
     r"chain family: expected one of \['llava', 'qwen2_5_vl'\].*'gemma3'"),
])
def test_the_manifest_checks_the_image_token_bounds_and_the_family_fields(qwen_artifact, tmp_path, edit, message):
    root = tmp_path / "art"
    shutil.copytree(qwen_artifact, root)
    doc = json.loads((root / MANIFEST).read_text())
    edit(doc)
    (root / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match=message):
        read_manifest(root)


def test_the_processor_is_saved_without_torchvision_and_loads_back(tiny_qwen, qwen_artifact, tmp_path):
    saved = qwen_artifact / "processor"
    for loaded in (load_processor(saved), FAMILIES["qwen2_5_vl"].load_processor(str(saved)),
                   Pipeline.load(qwen_artifact).processor):
        assert type(loaded) is type(tiny_qwen.processor) and loaded.chat_template == tiny_qwen.processor.chat_template
        text = loaded.tokenizer.decode(loaded.tokenizer("<|image_pad|> hi").input_ids)
        assert text == "<|image_pad|> hi"
        a = loaded(images=[_image(100)], text=["<|image_pad|> hi"], return_tensors="pt")
        b = tiny_qwen.processor(images=[_image(100)], text=["<|image_pad|> hi"], return_tensors="pt")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # Narrower bounds: the saved image processor's pixel bounds follow them, and every image lands inside.
    bounded = FAMILIES["qwen2_5_vl"].bounded_processor(tiny_qwen, 9, 20)
    save_processor(bounded, tmp_path / "p")
    assert (tmp_path / "p" / PARTS).is_file()
    config = json.loads((tmp_path / "p" / "preprocessor_config.json").read_text())
    assert config["size"] == {"shortest_edge": 9 * 28 * 28, "longest_edge": 20 * 28 * 28}
    again = load_processor(tmp_path / "p")
    for w, h in ((30, 30), (500, 90), (224, 224), (60, 200)):
        t, gh, gw = again.image_processor(images=[Image.new("RGB", (w, h))], return_tensors="pt")["image_grid_thw"][0]
        assert 9 <= int(gh * gw) // 4 <= 20, (w, h)


def test_image_token_bounds_are_checked(tiny, tiny_qwen):
    assert image_bounds(Limits(), tiny_qwen) == Limits(min_image_tokens=4, max_image_tokens=64)
    assert image_bounds(Limits(min_image_tokens=16), tiny_qwen).max_image_tokens == 64
    for lim, match in ((Limits(min_image_tokens=2), "min_image_tokens must be within the 4..64"),
                       (Limits(max_image_tokens=65), "max_image_tokens must be within the 4..64"),
                       (Limits(min_image_tokens=40, max_image_tokens=30),
                        r"min_image_tokens must not exceed the maximum image tokens \(30\), got 40")):
        with pytest.raises(BuildError, match=match):
            image_bounds(lim, tiny_qwen)
    with pytest.raises(BuildError, match="max_image_tokens applies to models whose image-token count follows the "
                                         r"image's size; builtin:tiny-llava \(llava\) has a fixed 64 image tokens"):
        image_bounds(Limits(max_image_tokens=16), tiny)
    assert image_bounds(Limits(), tiny) == Limits()


@pytest.mark.parametrize(("model", "flags", "message"), [
    ("builtin:tiny-qwen2.5-vl", ["--max-image-tokens", "65"],
     "--max-image-tokens must be within the 4..64 image tokens builtin:tiny-qwen2.5-vl's processor makes, got 65"),
    ("builtin:tiny-qwen2.5-vl", ["--min-image-tokens", "30", "--max-image-tokens", "20"],
     "--min-image-tokens must not exceed the maximum image tokens (20), got 30"),
    ("builtin:tiny-llava", ["--min-image-tokens", "8"], "--min-image-tokens applies to models whose image-token count"),
])
def test_compile_refuses_bad_image_token_bounds_with_one_line(model, flags, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert compile_cli.main([model, "--plan", "none", "-o", str(out), "--backend", "onnxruntime", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"btp-compile: error: {message}") and "\n" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_every_graph_equals_its_torch_module_on_captured_inputs(qwen_artifact, reference):
    batches = [([_image(SIDES[n], i)], PROMPTS[:1]) for i, n in enumerate(SIDES)]
    batches.append(([_image(112, 1), _image(112, 2)], PROMPTS))
    feeds = capture_feeds(reference, batches, 3)
    images = sorted({f["window_index"].shape[0] for f in feeds["vision"]})
    assert images == [4, 16, 64]
    manifest = read_manifest(qwen_artifact)
    for name, info in manifest.graphs.items():
        report = compare_graph(name, reference.engines[name], qwen_artifact / info.file, feeds[name], "float32")
        assert report.passed, (name, report.failures)
        assert max(report.worst.values()) <= 1e-4, (name, report.worst)


@pytest.mark.parametrize("tokens", sorted(SIDES))
def test_pipeline_gives_the_reference_tokens_at_every_image_size(qwen_artifact, reference, tokens):
    pipe = Pipeline.load(qwen_artifact)
    side = SIDES[tokens]
    for images, prompts in (([_image(side)], PROMPTS[:1]), ([_image(side, 1), _image(side, 2)], PROMPTS)):
        ours = pipe.generate(images, prompts, max_new_tokens=STEPS)
        theirs = reference.generate(images, prompts, max_new_tokens=STEPS)
        assert ours.token_ids == theirs.token_ids
        assert ours.kept_indices == theirs.kept_indices
        assert all(len(p) == len(q) for p, q in zip(ours.prompt_ids, theirs.prompt_ids))


def test_btp_check_passes_and_fails_naming_graph_and_output_when_perturbed(qwen_artifact, tmp_path, capsys,
                                                                           perturbed_head):
    assert check_cli.main([str(qwen_artifact), "--samples", "2", "--max-new-tokens", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["tokens"]["mean"] == 1.0
    assert {g["graph"] for g in report["graphs"]} == {"vision", "embed", "stage0", "head"}
    root = perturbed_head(qwen_artifact, tmp_path / "art")
    assert check_cli.main([str(root), "--samples", "1", "--max-new-tokens", "2", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    failing = [g for g in report["graphs"] if not g["passed"]]
    assert [g["graph"] for g in failing] == ["head"]
    assert failing[0]["failures"][0].startswith("onnxruntime: logits")


# divprune: a diversity prune before layer 0; btp: three stages of attention and diversity picks. pdrop (attention
# only, three stages) and fastv (one stage) pass this test too; each costs another compile (~40 s of CPU).
@pytest.mark.parametrize("preset", ["divprune", "btp"])  # fastv and pdrop: test_qwen_presets.py (another worker)
def test_pruned_presets_give_the_reference_tokens_and_kept_indices(compiled, tiny_qwen, preset):
    check_pruned_artifact(compiled(preset), tiny_qwen, preset)


def check_pruned_artifact(root, tiny_qwen, preset: str) -> None:
    """One artifact per preset serves every image size: keeps are shares of each image's tokens, computed in the
    prune graphs from the image span's length (TopK, no NonZero, output shapes expressions of the input shapes)."""
    pipe = Pipeline.load(root)
    ref = reference_pipeline(tiny_qwen, preset, max_positions=LIMITS.max_positions)
    ref.processor = pipe.processor
    kept = {}
    for tokens, side in SIDES.items():
        for images, prompts in (([_image(side)], PROMPTS[:1]), ([_image(side, 1), _image(side, 2)], PROMPTS)):
            ours = pipe.generate(images, prompts, max_new_tokens=STEPS)
            theirs = ref.generate(images, prompts, max_new_tokens=STEPS)
            assert ours.token_ids == theirs.token_ids, (tokens, len(images))
            assert ours.kept_indices == theirs.kept_indices, (tokens, len(images))
            kept[tokens] = [len(k) for k in ours.kept_indices[0]]
    # The keeps follow the image's size: never more for a smaller image, fewer for 16 tokens than for 64.
    assert all(a <= b <= c for a, b, c in zip(kept[4], kept[16], kept[64])) and kept[16] != kept[64], kept
    manifest = read_manifest(root)
    prunes = [st.prune for st in manifest.chain.spec().prunes]
    assert prunes
    batches = [([_image(side)], PROMPTS[:1]) for side in SIDES.values()] + [([_image(112, 1), _image(112, 2)], PROMPTS)]
    feeds = capture_feeds(ref, batches, 2)
    for name, info in manifest.graphs.items():
        report = compare_graph(name, ref.engines[name], root / info.file, feeds[name], "float32")
        assert report.passed and max(report.worst.values(), default=0.0) <= 1e-4, (name, report.failures)
    for name in prunes:
        model = onnx.load(str(root / manifest.graphs[name].file), load_external_data=False)
        ops = {node.op_type for node in model.graph.node}
        assert "TopK" in ops and "NonZero" not in ops, (name, ops)
        inputs = {d.dim_param for v in model.graph.input for d in v.type.tensor_type.shape.dim if d.dim_param}
        for out in model.graph.output:  # every dim a number or an expression of the input dims
            for d in out.type.tensor_type.shape.dim:
                assert d.dim_value > 0 or set(re.findall(r"[a-z_]+", d.dim_param)) <= inputs, (name, out.name, d)
            assert all(d.dim_value > 0 or d.dim_param for d in out.type.tensor_type.shape.dim), (name, out.name)
        assert lint_model(root / manifest.graphs[name].file) == [], name


def test_a_mixed_size_call_and_explain_run_on_a_compiled_artifact(compiled, tmp_path, capsys):
    """Images of 16, 64 (4x16), 64 (8x8) and 16 tokens in one call on the btp artifact (max batch 2): each row
    gets what it gets alone; btp-run --explain counts and draws the wide image's own 4x16 grid."""
    from btp.cli import run as run_cli

    root = compiled("btp")
    pipe = Pipeline.load(root)
    wide = Image.fromarray(np.asarray(_image(448, 5))[:112])  # 112x448 pixels: 4x16 image tokens
    images = [_image(112, 1), wide, _image(224, 2), _image(112, 3)]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1], "Which colour is on the left?"]
    together = pipe.generate(images, prompts, max_new_tokens=6)
    for row, (image, prompt) in enumerate(zip(images, prompts)):
        alone = pipe.generate([image], [prompt], max_new_tokens=6)
        assert together.token_ids[row] == alone.token_ids[0] and together.kept_indices[row] == alone.kept_indices[0]
    assert [len(k) for k in together.kept_indices[1]] == [32, 16, 8]
    wide.save(tmp_path / "wide.png")
    figure = tmp_path / "kept.png"
    rc = run_cli.main([str(root), "--image", str(tmp_path / "wide.png"), "--prompt", "What is shown?",
                       "--max-new-tokens", "4", "--explain", str(figure)])
    assert rc == 0 and "image tokens kept (of 64): prune1 32, prune2 16, prune3 8" in capsys.readouterr().err
    with Image.open(figure) as fig:
        assert fig.width > 6 * fig.height  # four panels in the image's 4:1 aspect (square ones: 3.6 to 1)
