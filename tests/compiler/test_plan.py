"""The plan document: validation rules, model checks, round trip, presets and the cost numbers of BTP.md."""

import json
from itertools import pairwise

import pytest

from btp.compiler import FORMAT, PRESETS, ModelInfo, Plan, model_info, resolve_plan
from btp.compiler.cost import decoder_flops
from btp.runtime.errors import PlanError

MODEL = {"family": "llava", "num_layers": 8, "image_tokens": 64, "grid": [8, 8], "fingerprint": "tiny-fp"}
LLAVA7B = ModelInfo(family="llava", num_layers=32, image_tokens=576, grid=(24, 24), fingerprint="llava-7b")
HIDDEN, INTERMEDIATE = 4096, 11008


def doc(*stages, model=None, **extra):
    return {"format": FORMAT, "model": dict(model or MODEL), "stages": list(stages), **extra}


def plan_error(data, source="plan"):
    with pytest.raises(PlanError) as info:
        Plan.parse(data, source=source)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------------------------- invalid
INVALID = [
    pytest.param({**doc(), "format": "btp-plan/9"}, "format", "expected 'btp-plan/1'", id="unknown-format"),
    pytest.param(doc({"layer": 8, "keep": 32}), "stages[0].layer", "must be below", id="layer-out-of-range"),
    pytest.param(doc({"layer": 3, "keep": 32}, {"layer": 3, "keep": 16}), "stages[1].layer",
                 "strictly increase", id="layers-not-increasing"),
    pytest.param(doc({"layer": 4, "keep": 32}, {"layer": 2, "keep": 16}), "stages[1].layer",
                 "strictly increase", id="layers-decreasing"),
    pytest.param(doc({"layer": 1, "keep": 32}, {"layer": 2, "keep": 32}), "stages[1].keep", "must decrease",
                 id="keep-not-decreasing"),
    pytest.param(doc({"layer": 1, "keep": 65}), "stages[0].keep", "above the 64 image tokens",
                 id="first-keep-above-image-tokens"),
    pytest.param(doc({"layer": 1, "keep": 10, "spatial": 6, "attention": 5}), "stages[0]",
                 "spatial + attention (6 + 5) exceeds keep (10)", id="spatial-plus-attention-above-keep"),
    pytest.param(doc({"layer": 1, "keep": 32}, {"layer": 2, "keep": 16, "spatial": 4}), "stages[1].spatial",
                 "only allowed at the first stage", id="spatial-at-second-stage"),
    pytest.param(doc({"layer": 1, "keep": 32, "spatial": 16}, model={**MODEL, "grid": [4, 16]}),
                 "stages[0].spatial", "square grid", id="spatial-on-non-square-grid"),
    pytest.param(doc({"layer": 0, "keep": 32, "attention": 8}), "stages[0].attention", "layer 0",
                 id="attention-at-layer-0"),
    pytest.param(doc({"layer": 1, "keep": 32, "attention": 30, "rho": 3.0}), "stages[0].rho",
                 "ceil(rho * attention) = 90 candidates exceed the 64", id="rho-candidates-exceed-alive"),
    pytest.param(doc({"layer": 1, "keep": 40, "spatial": 16, "attention": 20, "rho": 2.5}), "stages[0].rho",
                 "50 candidates exceed the 48 tokens left", id="rho-candidates-exceed-after-spatial"),
    pytest.param(doc({"layer": 1, "keep": 32}, {"layer": 2, "keep": 16, "attention": 12, "rho": 3.0}),
                 "stages[1].rho", "36 candidates exceed the 32", id="rho-candidates-exceed-second-stage"),
    pytest.param(doc({"layer": 1, "keep": -1}), "stages[0].keep", "greater than or equal to 0",
                 id="negative-keep"),
    pytest.param(doc({"layer": -1, "keep": 8}), "stages[0].layer", "greater than or equal to 0",
                 id="negative-layer"),
    pytest.param(doc({"layer": 1, "keep": 32, "rho": 0.5}), "stages[0].rho", "greater than or equal to 1",
                 id="rho-below-1"),
    pytest.param(doc({"layer": 1, "keep": 32, "lambda": 1.5}), "stages[0].lambda", "less than or equal to 1",
                 id="lambda-above-1"),
    pytest.param(doc({"layer": 1, "keep": 32, "ratio": 0.5}), "stages[0].ratio",
                 "Extra inputs are not permitted", id="unknown-stage-field"),
    pytest.param(doc(extra_field=1), "extra_field", "Extra inputs are not permitted",
                 id="unknown-plan-field"),
    pytest.param(doc(model={**MODEL, "grid": [8, 4]}), "model.grid", "does not hold 64 image tokens",
                 id="grid-product-mismatch"),
    pytest.param(doc(score="softmax"), "score", "'logits' or 'probs'", id="unknown-score"),
    pytest.param({"model": MODEL}, "format", "Field required", id="missing-format"),
]


@pytest.mark.parametrize(("data", "field", "rule"), INVALID)
def test_invalid_plan_names_field_and_rule(data, field, rule):
    msg = plan_error(data)
    assert msg.startswith(f"plan: {field}"), msg
    assert rule in msg, msg


@pytest.mark.parametrize("data", [p.values[0] for p in INVALID], ids=[p.id for p in INVALID])
def test_invalid_plan_text_fails_the_same_way(data):
    assert plan_error(json.dumps(data)) == plan_error(data)


def test_diversity_only_stage_at_layer_0_is_valid():
    plan = Plan.parse(doc({"layer": 0, "keep": 16}))
    assert plan.stages[0].diversity == 16
    assert plan.layer_tokens() == [16] * 8
    # spatial seeds need no attention: a layer-0 grid (the uniform-grid baseline) is valid, attention is not
    grid = Plan.parse(doc({"layer": 0, "keep": 16, "spatial": 16}))
    assert grid.stages[0].diversity == 0 and grid.stages[0].lambda_ is None  # no non-spatial picks
    msg = plan_error(doc({"layer": 0, "keep": 32, "spatial": 16, "attention": 4}))
    assert "stages[0].attention" in msg and "no attention before layer 0" in msg


def test_lambda_is_the_share_the_counts_give():
    """Whatever a document stores, `lambda` is attention / (keep - spatial); None where nothing is kept."""
    plan = Plan.parse(doc({"layer": 1, "keep": 32, "spatial": 8, "attention": 6, "lambda": 0.9},
                          {"layer": 3, "keep": 10, "attention": 10}, {"layer": 5, "keep": 0}))
    assert [s.lambda_ for s in plan.stages] == [0.25, 1.0, None]
    assert [s.get("lambda") for s in json.loads(plan.to_json())["stages"]] == [0.25, 1.0, None]


def test_released_selection_counts_int_candidates_over_all_tokens():
    """The released first stage ranks all alive tokens with int(rho * attention) candidates; ours ceil, after
    the seeds."""
    stage = {"layer": 1, "keep": 40, "spatial": 16, "attention": 20, "rho": 2.5}
    assert "50 candidates exceed the 48" in plan_error(doc(stage))
    plan = Plan.parse(doc({**stage, "selection": "released"}))
    assert plan.stages[0].candidates == 50
    assert Plan.parse(doc({**stage, "rho": 2.41, "selection": "released"})).stages[0].candidates == 48
    msg = plan_error(doc({**stage, "rho": 3.3, "selection": "released"}))
    assert "int(rho * attention) = 66 candidates exceed the 64 tokens alive" in msg


def test_valid_edges_pass():
    # rho exactly filling the tokens left, keep 0 at the end.
    plan = Plan.parse(doc({"layer": 1, "keep": 63, "spatial": 16, "attention": 16, "rho": 3.0},
                          {"layer": 7, "keep": 0}))
    assert plan.stages[0].candidates == 48
    assert plan.layer_tokens() == [64] + [63] * 6 + [0]
    # A first stage keeping every image token is a no-op, and refused.
    msg = plan_error(doc({"layer": 2, "keep": 64}))
    assert "stages[0].keep" in msg and "must decrease" in msg
    # Grids are positive.
    assert "model.grid" in plan_error(doc(model={**MODEL, "grid": [-8, -8]}))


def test_resolve_plan_takes_path_objects_and_any_json_case(tiny, tmp_path):
    plan = resolve_plan("btp", tiny)
    path = tmp_path / "plan.JSON"
    plan.save(path)
    assert resolve_plan(path, tiny) == plan
    assert resolve_plan(str(path), tiny) == plan


@pytest.mark.parametrize("text", ["{not json", "", '{"format": "btp-plan/1",}', "[1, 2"])
def test_invalid_json_text(text):
    msg = plan_error(text, source="my.json")
    assert msg.startswith("my.json: not valid JSON"), msg


def test_load_missing_file_names_path(tmp_path):
    path = tmp_path / "absent" / "plan.json"
    with pytest.raises(PlanError) as info:
        Plan.load(path)
    msg = str(info.value)
    assert str(path) in msg and "cannot read plan" in msg
    assert "\n" not in msg


def test_load_invalid_file_names_path(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc({"layer": 9, "keep": 1})))
    with pytest.raises(PlanError, match=r"bad\.json: stages\[0\]\.layer"):
        Plan.load(path)


# --------------------------------------------------------------------------------------------- model
def test_check_model_rejects_other_models(tiny):
    info = model_info(tiny)
    plan = PRESETS["btp"](info)
    plan.check_model(info)
    assert resolve_plan(plan, tiny) is plan
    with pytest.raises(PlanError, match=r"^model\.fingerprint"):
        plan.check_model(info.model_copy(update={"fingerprint": "0" * 64}))
    with pytest.raises(PlanError, match=r"^model\.num_layers"):
        plan.check_model(info.model_copy(update={"num_layers": 12}))
    with pytest.raises(PlanError, match=r"^model\.family"):
        plan.check_model(info.model_copy(update={"family": "qwen2_vl"}))


def test_resolve_plan_file_of_another_model(tiny, tmp_path):
    path = tmp_path / "plan.json"
    PRESETS["btp"](model_info(tiny).model_copy(update={"fingerprint": "f" * 64})).save(path)
    with pytest.raises(PlanError, match="model.fingerprint"):
        resolve_plan(str(path), tiny)


@pytest.mark.parametrize("spec", ["bpt", "BTP", "", 42])
def test_resolve_unknown_preset(tiny, spec):
    with pytest.raises(PlanError, match="unknown plan"):
        resolve_plan(spec, tiny)


# --------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("name", list(PRESETS))
def test_round_trip(tiny, tmp_path, name):
    plan = resolve_plan(name, tiny)
    path = tmp_path / f"{name}.json"
    plan.save(path)
    assert Plan.load(path) == plan
    assert resolve_plan(str(path), tiny) == plan
    raw = json.loads(path.read_text())
    assert raw["format"] == "btp-plan/1"
    for stage, saved in zip(plan.stages, raw["stages"], strict=True):
        assert "lambda_" not in saved
        assert saved.get("lambda") == stage.lambda_
    if name == "btp":  # the shares its counts give (8 seeds, 4 of 8, 14 of 16, 5 of 5 on tiny-llava)
        assert [s.get("lambda") for s in raw["stages"]] == [
            round(s.attention / (s.keep - s.spatial), 6) if s.keep else None for s in plan.stages]
        assert {s["selection"] for s in raw["stages"]} == {"released"}


# --------------------------------------------------------------------------------------------- presets
def paper_flops(plan, text_tokens=0):
    n0, d, m = plan.model.image_tokens, HIDDEN, INTERMEDIATE
    total, alive = 0.0, n0
    starts = {s.layer: s.keep for s in plan.stages}
    for layer in range(plan.model.num_layers):
        alive = starts.get(layer, alive)
        n = alive + text_tokens
        total += 4 * n * d**2 + 2 * n**2 * d + 3 * n * d * m
    return total


def test_btp_preset_on_llava_7b():
    plan = PRESETS["btp"](LLAVA7B)
    assert tuple(s.layer for s in plan.stages) == (3, 6, 14, 22)
    assert tuple(s.keep for s in plan.stages) == (288, 144, 48, 0)
    assert tuple(s.spatial for s in plan.stages) == (144, 0, 0, 0)
    assert tuple(s.attention for s in plan.stages) == (86, 129, 48, 0)
    assert tuple(s.rho for s in plan.stages)[:3] == (3.7, 1.5, 1.2)
    assert tuple(s.rebalance for s in plan.stages) == (True, True, True, False)
    assert plan.average_image_tokens() == 129.0
    flops = plan.flops(HIDDEN, INTERMEDIATE, text_tokens=0)
    assert flops == pytest.approx(paper_flops(plan), rel=1e-12)
    assert flops == pytest.approx(0.85e12, rel=0.01)
    none = PRESETS["none"](LLAVA7B).flops(HIDDEN, INTERMEDIATE)
    assert none == pytest.approx(3.82e12, rel=0.01)
    assert none == pytest.approx(32 * decoder_flops(576, HIDDEN, INTERMEDIATE))
    assert plan.flops(HIDDEN, INTERMEDIATE, text_tokens=40) == pytest.approx(paper_flops(plan, 40))


def test_fastv_preset_on_llava_7b():
    plan = PRESETS["fastv"](LLAVA7B)
    (stage,) = plan.stages
    assert stage.layer == 2 and stage.attention == stage.keep and stage.spatial == 0
    assert not stage.rebalance
    assert abs(plan.average_image_tokens() - PRESETS["btp"](LLAVA7B).average_image_tokens()) <= 1


def test_pdrop_preset_on_llava_7b():
    plan = PRESETS["pdrop"](LLAVA7B)
    assert tuple(s.layer for s in plan.stages) == (8, 16, 24)
    assert tuple(s.keep for s in plan.stages) == (288, 144, 72)
    assert all(s.attention == s.keep and s.spatial == 0 for s in plan.stages)


def test_divprune_and_none_presets_on_llava_7b():
    (stage,) = PRESETS["divprune"](LLAVA7B).stages
    assert (stage.layer, stage.attention, stage.spatial, stage.keep) == (0, 0, 0, round(129))
    none = PRESETS["none"](LLAVA7B)
    assert none.stages == () and none.average_image_tokens() == 576


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_on_tiny(tiny, name):
    plan = PRESETS[name](model_info(tiny))
    reparsed = Plan.parse(plan.to_json())  # the preset itself passes every rule
    assert reparsed == plan
    layers = [s.layer for s in plan.stages]
    assert layers == sorted(set(layers))
    assert all(0 <= layer < tiny.num_layers for layer in layers)
    if name == "divprune":
        assert layers == [0]
    else:
        assert all(layer >= 1 for layer in layers)
    assert bool(plan.stages) == (name != "none")
    assert plan.calibration == {"method": f"preset:{name}"}


# --------------------------------------------------------------------------------------------- layer tokens
@pytest.mark.parametrize("info", [LLAVA7B, ModelInfo(**MODEL)], ids=["llava7b", "tiny"])
@pytest.mark.parametrize("name", list(PRESETS))
def test_layer_tokens(info, name):
    plan = PRESETS[name](info)
    counts = plan.layer_tokens()
    assert len(counts) == info.num_layers
    assert all(a >= b for a, b in pairwise(counts))
    assert counts[0] <= info.image_tokens
    for stage in plan.stages:
        assert counts[stage.layer] == stage.keep
        if stage.layer:
            assert counts[stage.layer - 1] > stage.keep
    assert plan.average_image_tokens() == pytest.approx(sum(counts) / len(counts))


# --------------------------------------------------------------------------------------------- edges
def test_infinite_rho_is_a_plan_error():
    stage = '{"layer": 1, "keep": 32, "attention": 5, "rho": Infinity}'
    msg = plan_error(f'{{"format": "btp-plan/1", "model": {json.dumps(MODEL)}, "stages": [{stage}]}}')
    assert "stages[0].rho" in msg


def test_non_utf8_plan_file_is_a_plan_error(tmp_path):
    path = tmp_path / "plan.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PlanError, match="not a UTF-8 JSON text"):
        Plan.load(path)


def test_python_field_name_is_not_a_document_key():
    msg = plan_error(doc({"layer": 1, "keep": 32, "lambda_": 0.5}))
    assert "stages[0].lambda_" in msg


@pytest.mark.parametrize(("preset", "tokens", "grid"), [("btp", 4, (2, 2)), ("pdrop", 1, (1, 1))])
def test_presets_that_do_not_fit_tiny_images_say_so_in_one_line(preset, tokens, grid):
    info = ModelInfo(family="llava", num_layers=32, image_tokens=tokens, grid=grid, fingerprint="x")
    with pytest.raises(PlanError) as err:
        PRESETS[preset](info)
    assert f"preset {preset!r} does not fit" in str(err.value) and "\n" not in str(err.value)
    # Single-stage presets still fit where btp does not (they fall back to the published token share).
    if preset == "btp":
        assert PRESETS["fastv"](info).stages[0].keep == 1 and PRESETS["divprune"](info).stages[0].keep == 1


def test_single_stage_presets_work_on_shallow_models():
    info = ModelInfo(family="llava", num_layers=3, image_tokens=64, grid=(8, 8), fingerprint="x")
    with pytest.raises(PlanError, match="too shallow"):
        PRESETS["btp"](info)
    assert PRESETS["divprune"](info).stages[0].keep == round(64 * 129 / 576)
    assert PRESETS["fastv"](info).stages[0].layer == 1


@pytest.mark.parametrize("name", ["btp", "pdrop", "fastv", "divprune"])
@pytest.mark.parametrize("share", [0.22, 0.3])
def test_presets_at_a_budget_hit_the_layer_averaged_share(name, share):
    from btp.compiler.presets import at_budget

    info = ModelInfo(family="llava", num_layers=32, image_tokens=576, grid=(24, 24), fingerprint="f" * 64)
    if name == "pdrop" and share < 0.25:  # its first cut is at a quarter of the depth
        with pytest.raises(PlanError, match="out of reach.*first cut is layer 8"):
            at_budget(name, info, share)
        return
    plan = at_budget(name, info, share)
    assert abs(plan.average_image_tokens() / 576 - share) < 0.005
    assert plan.calibration["method"] == f"preset:{name}@{share:g}"


def test_btp_at_the_published_budget_keeps_its_shape():
    from btp.compiler.presets import at_budget, btp

    info = ModelInfo(family="llava", num_layers=32, image_tokens=576, grid=(24, 24), fingerprint="f" * 64)
    scaled, published = at_budget("btp", info, 0.22), btp(info)
    assert [s.layer for s in scaled.stages] == [s.layer for s in published.stages]
    assert all(a.keep < b.keep for a, b in zip(scaled.stages[1:], scaled.stages))
    assert scaled.stages[0].spatial == round(scaled.stages[0].keep / 2)
