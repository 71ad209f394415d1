"""Cut a loaded model at a plan's boundaries into the `graphs` modules and the runtime's `ChainSpec`."""

from __future__ import annotations

from torch import nn

from btp.graphs import PruneGraph, Recipe, StageGraph, spatial_seeds
from btp.runtime.chain import ChainSpec, StageLayout
from btp.runtime.errors import PlanError

from .plan import Plan


def stage_layout(plan: Plan, every_layer: bool = False) -> list[StageLayout]:
    """Stage graphs `[L_s, L_{s+1})` cut at the plan's layers; a prune runs before each cut (incl. layer 0).
    `every_layer`: one stage per layer (cuts without a plan stage have no prune)."""
    depth, n0 = plan.model.num_layers, plan.model.image_tokens
    by_layer = {s.layer: s for s in plan.stages}
    cuts = list(range(depth + 1)) if every_layer else sorted({0, *by_layer, depth})
    out, alive = [], n0
    for j, (a, b) in enumerate(zip(cuts, cuts[1:])):
        prune = None
        if a in by_layer:
            prune, alive = f"prune{j}", by_layer[a].keep
        out.append(StageLayout(name=f"stage{j}", layers=tuple(range(a, b)), image_tokens=alive, prune=prune))
    return out


def recipes(plan: Plan) -> list[Recipe]:
    """One selection recipe per plan stage, in order: static counts, or a plan of shares' counts of N0."""
    out, alive, alive_share = [], plan.model.image_tokens, None
    for i, s in enumerate(plan.stages):
        seeds = spatial_seeds(plan.model.grid[0], s.spatial, plan.spatial_metric) if s.spatial else ()
        released = s.selection == "released"
        out.append(Recipe(alive=alive, keep=s.keep, seeds=seeds, attention=s.attention, rho=s.rho,
                          rebalance=s.rebalance, released=released, union=released and i == 0 and s.keep > 0,
                          share=s.share, alive_share=alive_share))
        alive, alive_share = s.keep, s.share
    return out


def check_image_range(plan: Plan, lo: int, hi: int) -> None:
    """Raise `PlanError` unless a plan of shares makes a valid selection at every image-token count in
    `[lo, hi]`: keeps that do not grow, candidate pools no larger than the tokens they rank."""
    if not plan.dynamic:
        return
    for n in range(lo, hi + 1):
        for i, r in enumerate(recipes(plan)):
            c = r.at(n)
            room = c.alive if r.union else c.alive - len(r.seeds)
            if c.keep > c.alive or c.candidates > room:
                raise PlanError(f"stages[{i}]: at {n} image tokens the plan keeps {c.keep} of {c.alive} with "
                                f"{c.candidates} attention candidates of the {room} tokens they rank; expected "
                                "keep and candidates within the tokens alive (raise {option})",
                                option="min_image_tokens")


def build_graphs(model, plan: Plan, max_positions: int | None = None,
                 per_layer: bool = False) -> tuple[dict[str, nn.Module], ChainSpec]:
    """`model` (a `LoadedModel`) and a checked `plan` -> graph modules keyed by name, and the chain spec.

    `per_layer` (calibration's statistics chain, run in torch and never exported): one stage per layer, each
    handing over all rows and its last query row's attention probabilities as `scores [B,P+T]`."""
    fam, hf, dtype = model.family, model.hf, model.dtype
    t = model.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    layers = fam.decoder_layers(hf)
    rotary = fam.rotary(hf, max_positions)
    layout = stage_layout(plan, every_layer=per_layer)
    recipe_of = dict(zip((s.prune for s in layout if s.prune), recipes(plan)))
    shares, alive_share = plan.dynamic, None
    rows = rotary.position_dims[0] if len(rotary.position_dims) == 3 else 0  # M-RoPE: [3,B,T] position ids
    n0 = model.image_tokens
    graphs: dict[str, nn.Module] = {"vision": fam.vision(hf, dtype), "embed": fam.embed(hf, dtype)}
    graphs["embed"].image_tokens = n0  # the prefill range of its image_tokens dim
    for j, st in enumerate(layout):
        nxt = layout[j + 1] if j + 1 < len(layout) else None
        wants_scores = nxt is not None and nxt.prune is not None and recipe_of[nxt.prune].attention > 0
        score_mode = "probs" if per_layer else (plan.score if wants_scores else None)
        if st.prune:
            alive_share = recipe_of[st.prune].share
            graphs[st.prune] = PruneGraph(st.prune, recipe_of[st.prune], t.hidden_size, dtype, image_tokens=n0,
                                          position_rows=rows)
        graphs[st.name] = StageGraph(
            st.name, [layers[i] for i in st.layers], st.layers[0], rotary, t.num_key_value_heads, head_dim,
            t.hidden_size, dtype, score_mode=score_mode, final=nxt is None and not per_layer,
            image_tokens=n0, alive=st.image_tokens, alive_share=alive_share, shares=shares,
        )
    graphs["head"] = fam.head(hf, dtype)
    graphs["head"].all_rows = per_layer
    tok = model.processor.tokenizer
    eos = hf.generation_config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    if not eos_ids and tok.eos_token_id is not None:
        eos_ids = (tok.eos_token_id,)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    spec = ChainSpec(
        stages=tuple(layout),
        image_tokens=model.image_tokens,
        grid=model.grid,
        image_size=model.image_size,
        image_token_id=model.image_token_id,
        pad_token_id=int(pad),
        eos_token_ids=tuple(int(e) for e in eos_ids),
        hidden_size=t.hidden_size,
        num_kv_heads=t.num_key_value_heads,
        head_dim=head_dim,
        dtype=str(dtype).removeprefix("torch."),
        max_positions=int(rotary.cos.shape[0]),
        family=fam.name,
        **fam.input_fields(hf.config),
    )
    for g in graphs.values():
        g.eval()
    return graphs, spec
