"""The runtime's one module of I/O names is pinned to the graph specs it runs."""

import re

from btp.compiler.assemble import build_graphs
from btp.compiler.presets import resolve_plan
from btp.runtime import names


def test_every_graph_io_name_is_a_runtime_constant_and_every_constant_is_used(tiny, tiny_qwen):
    used = set()
    for model, preset in ((tiny, "btp"), (tiny, "fastv"), (tiny, "divprune"), (tiny_qwen, "none"), (tiny_qwen, "btp")):
        graphs, chain = build_graphs(model, resolve_plan(preset, model), 512)
        assert {names.VISION, names.EMBED, names.HEAD} <= set(graphs)
        for module in graphs.values():
            spec = module.spec()
            for t in (*spec.inputs, *spec.outputs):
                kv = re.fullmatch(r"(past_key_values\.|present\.)(\d+)\.(key|value)", t.name)
                if kv:
                    assert kv.group(1) in (names.PAST, names.PRESENT) and kv.group(3) in names.KV_KINDS
                    past = names.past(int(kv.group(2)), kv.group(3))
                    assert names.as_past(names.as_present(past)) == past
                else:
                    assert t.name in names.ALL, (spec.name, t.name)
                    used.add(t.name)
    assert used == names.ALL
