"""One spec and one `Bounds` per graph: the export dims, the TensorRT profiles, the manifest's phases and the
shapes the runtime actually feeds are all derived from them, and they agree."""

import onnx
import pytest

from btp.artifact.manifest import read_manifest
from btp.compiler.assemble import build_graphs
from btp.compiler.export import export_dims
from btp.compiler.presets import resolve_plan
from btp.compiler.trt_profiles import manifest_profiles
from btp.runtime import Pipeline
from btp.runtime.chain import Bounds

LIMITS = Bounds(max_batch=4, max_prompt=256, max_new_tokens=64)  # the conftest artifacts' bounds


@pytest.fixture(scope="module")
def built(tiny, artifact):
    graphs, _ = build_graphs(tiny, resolve_plan("btp", tiny), LIMITS.max_positions)
    root = artifact("btp")
    return graphs, read_manifest(root), root


def _fits(shape, profile):
    lo, _, hi = profile
    return len(shape) == len(lo) and all(a <= s <= b for s, a, b in zip(shape, lo, hi))


def test_manifest_phases_and_profiles_are_the_specs_under_the_bounds(built):
    graphs, manifest, root = built
    assert manifest.build.bounds == LIMITS
    for name, module in graphs.items():
        spec = module.spec()
        recorded = [(p.name, {d: tuple(r) for d, r in p.dims.items()}) for p in manifest.graphs[name].phases]
        assert recorded == [(p.name, p.dims) for p in spec.ranges(LIMITS)], name
        profiles = manifest_profiles(manifest, name)
        assert len(profiles) == len(recorded) and {n for n, _ in recorded} <= {"prefill", "decode"}
        # The exported graph accepts exactly the union of its profiles, dim by dim.
        dims = export_dims(spec, LIMITS)
        for t in spec.inputs:
            for i, d in enumerate(t.shape):
                if isinstance(d, str) and d in dims:
                    lo = min(p[t.name][0][i] for p in profiles)
                    hi = max(p[t.name][2][i] for p in profiles)
                    assert (lo, hi) == dims[d], (name, t.name, d)
        # ... and the ONNX file declares the spec's dims by name.
        model = onnx.load(str(root / manifest.graphs[name].file), load_external_data=False)
        declared = {v.name: [x.dim_param or x.dim_value for x in v.type.tensor_type.shape.dim]
                    for v in model.graph.input}
        for t in spec.inputs:
            assert declared[t.name] == list(t.shape), (name, t.name)


def test_every_shape_the_runtime_feeds_fits_a_profile_of_its_graph(built, images):
    """Prefill and decode at batch 1 and 2, short and long prompts: each graph call (empty pasts included) lies
    inside one of the profiles the graph's spec declares, prefill calls in prefill, decode calls in decode."""
    _, manifest, root = built
    pipe = Pipeline.load(root)
    profiles = {name: dict(zip((p.name for p in manifest.graphs[name].phases), manifest_profiles(manifest, name)))
                for name in manifest.graphs}
    calls = []

    def observe(name, feeds, _outputs):
        calls.append((name, {k: list(v.shape) for k, v in feeds.items()}))

    long = "Describe the picture in detail, " * 14  # near the 256-token bound
    for imgs, prompts in (([images[0]], ["What is shown?"]), (images, ["Hi", long])):
        calls.clear()
        pipe.generate(imgs, prompts, max_new_tokens=4, min_new_tokens=4, on_graph=observe)
        phase = {}
        for name, shapes in calls:
            # The first call of a graph is prefill, the later ones (embed, stages, head) decode steps.
            want = "prefill" if name not in phase else "decode"
            phase[name] = want
            profile = profiles[name].get(want, profiles[name]["prefill"])
            for k, shape in shapes.items():
                assert _fits(shape, profile[k]), (name, want, k, shape, profile[k])
        empty = [s for n, f in calls for k, s in f.items() if k.startswith("past_key_values") and s[2] == 0]
        assert empty, "prefill feeds empty pasts"


def test_a_bound_of_one_value_still_exports(tmp_path, images):
    """`--max-batch 1` makes the batch range a single value, which torch.export cannot make dynamic: the
    graphs are traced one wider and the artifact runs (it failed with an internal error)."""
    from btp.compiler.build import BuildConfig, compile_artifact

    out = tmp_path / "b1"
    compile_artifact(BuildConfig(model="builtin:tiny-llava", plan="none", out=out, backend="onnxruntime",
                                 limits=Bounds(max_batch=1, max_prompt=128, max_new_tokens=8)))
    pipe = Pipeline.load(out)
    assert pipe.manifest.graphs["embed"].phases[0].dims["batch"] == [1, 1, 1]
    assert len(pipe.generate(images[:1], ["What is shown?"], max_new_tokens=2).token_ids[0]) >= 1
