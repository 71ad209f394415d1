"""`ChainSpec` holds its size bounds as one `Bounds`; the manifest's chain document stores them flat, as before."""

from dataclasses import replace

from btp.compiler import build_graphs, resolve_plan
from btp.runtime.chain import Bounds, ChainSpec


def test_bounds_round_trip_through_the_manifest_document(tiny):
    bounds = Bounds(max_batch=2, max_prompt=200, max_new_tokens=56)
    _, chain = build_graphs(tiny, resolve_plan("btp", tiny), bounds.max_positions)
    assert chain.bounds is None and chain.max_prompt is None and chain.max_batch is None  # a reference chain
    built = replace(chain, bounds=bounds)
    doc = built.to_dict()
    assert "bounds" not in doc and (doc["max_prompt"], doc["max_batch"], doc["max_positions"]) == (200, 2, 256)
    back = ChainSpec.from_dict(doc)
    assert back == built and back.bounds == bounds and (back.max_prompt, back.max_batch) == (200, 2)
    assert ChainSpec.from_dict(chain.to_dict()) == chain  # no bounds stays no bounds
