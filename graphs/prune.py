"""`PruneGraph`: the BTP selection and the sequence gathers between two decoder stages (static counts)."""

from __future__ import annotations

import torch
from torch import nn

from .selection import SHARE_UNIT, Recipe, select
from .spec import BATCH, IMAGES, SEQ, GraphSpec, TensorSpec, prune_phases


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x [B,T,...]`, `index [B,T']` -> `x` gathered along dim 1, `[B,T',...]`."""
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[2]))


def sequence_index(image_start: torch.Tensor, keep: torch.Tensor, seq: int, alive: int) -> torch.Tensor:
    """Source rows of `[prefix | kept image tokens | text]`.

    `image_start [B]` int64, `keep [B,k]` int64 (ascending, relative to the image span) -> `[B, seq-alive+k]`.
    """
    k = keep.shape[1]
    out = torch.arange(seq - alive + k, device=keep.device)[None, :]  # [1,T']
    rel = out - image_start[:, None]  # [B,T'] position relative to the span start
    after = out + (alive - k)
    if isinstance(k, int):
        if k == 0:
            return torch.where(rel < 0, out, after)
        inside = image_start[:, None] + keep.gather(1, rel.clamp(0, k - 1))
    else:  # k follows the input shapes and may be 0: gather from one spare column
        padded = torch.cat([keep, keep.new_zeros(keep.shape[0], 1)], dim=1)  # [B,k+1]
        inside = image_start[:, None] + padded.gather(1, rel.clamp(0, k))
    return torch.where(rel < 0, out, torch.where(rel < k, inside, after))


def keep_rows(hidden_states, position_ids, attention_mask, image_start, keep: torch.Tensor, alive: int):
    """The prune's outputs for kept image tokens `keep [B,k]` of the `alive`-token span at `image_start [B]`:
    `hidden_states [B,T,D]`, `position_ids` (`[B,T]`, or `[3,B,T]` for M-RoPE: every row gathered) and
    `attention_mask [B,T]` gathered to `[prefix | kept | text]`, `T' = T - alive + k` rows."""
    index = sequence_index(image_start, keep, hidden_states.shape[1], alive)  # [B,T']
    pos = gather_rows(position_ids, index) if position_ids.dim() == 2 else \
        position_ids.gather(2, index[None].expand(position_ids.shape[0], -1, -1))
    return gather_rows(hidden_states, index), pos, gather_rows(attention_mask, index)


class PruneGraph(nn.Module):
    """Select `keep` of the `alive` image tokens of each row and gather the sequence to `T - alive + keep`.

    Inputs: `hidden_states [B,T,D]`, `position_ids [B,T]` int64 (`[3,B,T]` M-RoPE), `attention_mask [B,T]` int64,
    `scores [B,T]` fp32 (only when the recipe has attention picks), `image_start [B]` int64.
    Outputs: `pruned_hidden_states`, `pruned_position_ids`, `pruned_attention_mask`, the first three inputs
    gathered to `[B, T - alive + keep, ...]`, and `keep_indices [B,keep]` int64
    (ascending positions inside the current image span). Position ids are gathered, never renumbered.
    A share recipe also takes `image_span [N0]` int64 (only its length is read): `alive` and `keep` are then
    `share_count`s of N0, computed in the graph from that dim.
    """

    def __init__(self, name: str, recipe: Recipe, hidden_size: int, dtype: torch.dtype, image_tokens: int = 0,
                 position_rows: int = 0):
        super().__init__()
        self.name, self.recipe, self.hidden_size, self.dtype = name, recipe, hidden_size, dtype
        self.position_rows = position_rows  # 0: `position_ids [B,T]`; 3: M-RoPE `[3,B,T]`, every row gathered
        self.image_tokens = image_tokens or recipe.alive  # N0 of the model: with alive, the longest sequence

    @property
    def uses_scores(self) -> bool:
        return self.recipe.attention > 0

    @property
    def shares(self) -> bool:
        return self.recipe.share is not None

    def _out_seq(self) -> str:
        r = self.recipe
        if not self.shares:
            return f"{SEQ} - {r.alive - r.keep}" if r.alive != r.keep else SEQ
        count = lambda share: f"{IMAGES} * {round(share * SHARE_UNIT)} // {SHARE_UNIT}"  # noqa: E731
        alive = IMAGES if r.alive_share is None else f"({count(r.alive_share)})"
        return f"{SEQ} - {alive} + {count(r.share)}" if r.share else f"{SEQ} - {alive}"

    def spec(self) -> GraphSpec:
        r = self.recipe
        out_seq = self._out_seq()
        keep = r.keep if not self.shares else f"{IMAGES} * {round(r.share * SHARE_UNIT)} // {SHARE_UNIT}"
        rows = (self.position_rows,) if self.position_rows else ()
        inputs = [
            TensorSpec("hidden_states", self.dtype, (BATCH, SEQ, self.hidden_size)),
            TensorSpec("position_ids", torch.int64, (*rows, BATCH, SEQ)),
            TensorSpec("attention_mask", torch.int64, (BATCH, SEQ)),
        ]
        if self.uses_scores:
            inputs.append(TensorSpec("scores", torch.float32, (BATCH, SEQ)))
        inputs.append(TensorSpec("image_start", torch.int64, (BATCH,)))
        if self.shares:
            inputs.append(TensorSpec("image_span", torch.int64, (IMAGES,)))
        # ONNX names are single-assignment: the gathered tensors cannot reuse their inputs' names.
        outputs = (
            TensorSpec("pruned_hidden_states", self.dtype, (BATCH, out_seq, self.hidden_size)),
            TensorSpec("pruned_position_ids", torch.int64, (*rows, BATCH, out_seq)),
            TensorSpec("pruned_attention_mask", torch.int64, (BATCH, out_seq)),
            TensorSpec("keep_indices", torch.int64, (BATCH, keep)),
        )
        phases = prune_phases(self.image_tokens, r.alive, r.alive_share if self.shares else None, self.shares)
        return GraphSpec(self.name, tuple(inputs), outputs, phases)

    def forward(self, hidden_states, position_ids, attention_mask, *rest):
        """See the class docstring; `rest` is `(scores, image_start)` or `(image_start,)`, then `image_span` for
        a share recipe."""
        rest = list(rest)
        n0 = rest.pop().shape[0] if self.shares else None
        scores, image_start = rest if self.uses_scores else (None, rest[0])
        alive = self.recipe.at(n0).alive
        span = image_start[:, None] + torch.arange(alive, device=hidden_states.device)[None, :]  # [B,N]
        image_hidden = gather_rows(hidden_states, span)  # [B,N,D]
        image_scores = gather_rows(scores, span) if scores is not None else None  # [B,N]
        keep = select(image_hidden, image_scores, self.recipe, n0)  # [B,k]
        return (*keep_rows(hidden_states, position_ids, attention_mask, image_start, keep, alive), keep)
