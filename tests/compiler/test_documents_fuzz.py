"""Hypothesis fuzzing of the documents users hand btp, plans and artifact manifests: whatever the document,
nothing escapes but the project's own one-line errors."""

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from btp.artifact.manifest import MANIFEST, read_manifest
from btp.runtime import ArtifactError, BtpError, Pipeline

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                          max_size=4), max_leaves=12)


def _paths(doc, path=()):
    if path:
        yield path
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for k, v in items:
        yield from _paths(v, (*path, k))


def _mutate(doc, data):
    """`doc` with a few drawn fields replaced by drawn JSON values or removed."""
    doc = json.loads(json.dumps(doc))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if isinstance(parent, dict) and data.draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(json_values)
    return doc


def _one_line(err):
    assert "\n" not in str(err) and str(err)


@pytest.fixture(scope="module")
def tiny():
    from btp.compiler import load_model

    return load_model("builtin:tiny-llava")


@SETTINGS
@given(doc=json_values)
def test_any_json_is_a_plan_or_a_plan_error(doc):
    from btp.compiler.plan import Plan, PlanError

    try:
        Plan.parse(json.dumps(doc))
    except PlanError as err:
        _one_line(err)


@SETTINGS
@given(data=st.data())
def test_a_mutated_plan_is_a_plan_or_a_plan_error(tiny, data):
    from btp.compiler.plan import PlanError
    from btp.compiler.presets import resolve_plan

    base = json.loads(resolve_plan("btp", tiny).to_json())
    doc = _mutate(base, data)
    from btp.compiler.plan import Plan

    try:
        plan = Plan.parse(json.dumps(doc))
        resolve_plan(plan, tiny)
    except PlanError as err:
        _one_line(err)


@pytest.fixture(scope="module")
def artifact_copy(artifact, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz") / "art"
    shutil.copytree(artifact("btp"), root)
    return root


@SETTINGS
@given(data=st.data())
def test_a_mutated_manifest_loads_or_is_an_artifact_error(artifact_copy, data):
    """Loading refuses with ArtifactError, or the manifest still describes the artifact and it runs (an
    edit of a record-only field, such as the plan or the export time, changes nothing that runs)."""
    from PIL import Image

    root = artifact_copy
    original = (root / MANIFEST).read_text()
    doc = _mutate(json.loads(original), data)
    try:
        (root / MANIFEST).write_text(json.dumps(doc))
        try:
            read_manifest(root, verify=False)
        except ArtifactError as err:
            _one_line(err)
            return
        try:
            pipe = Pipeline.load(root)
        except ArtifactError as err:
            _one_line(err)
            return
        try:
            pipe.generate([Image.new("RGB", (32, 32), "red")], ["What is it?"], max_new_tokens=1)
        except BtpError as err:
            _one_line(err)
    finally:
        (root / MANIFEST).write_text(original)
