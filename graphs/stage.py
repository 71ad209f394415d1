"""`StageGraph`: a contiguous run of decoder layers `[first, last)` with explicit per-layer KV and scores."""

from __future__ import annotations

import torch
from torch import nn

from .layers import DecoderLayer, RotaryTable, additive_mask
from .spec import BATCH, PAST, SEQ, TOTAL, GraphSpec, TensorSpec, past_name, present_name, stage_phases


class StageGraph(nn.Module):
    """Layers `[first, first + len(layers))` of the text model, one graph for prefill and decode.

    Inputs: `inputs_embeds [B,T,D]`, `position_ids [B,T]` int64 (`[3,B,T]` with an M-RoPE table),
    `attention_mask [B,P+T]` int64, then
    `past_key_values.{i}.key/value [B,Hkv,P,Dh]` for each layer `i`. Outputs: `hidden_states [B,T,D]`,
    `present.{i}.key/value [B,Hkv,P+T,Dh]` (a `final` stage, the model's last, outputs `hidden_states [B,1,D]`,
    the row the head reads), and (when `score_mode` is set) `scores [B,P+T]` fp32: the
    head-mean attention of the last query row in the stage's last layer, which the next prune graph ranks by.
    """

    def __init__(
        self,
        name: str,
        layers: list[DecoderLayer],
        first_layer: int,
        rotary: RotaryTable,
        num_kv_heads: int,
        head_dim: int,
        hidden_size: int,
        dtype: torch.dtype,
        score_mode: str | None = None,
        final: bool = False,
        image_tokens: int = 0,
        alive: int | None = None,
        alive_share: float | None = None,
        shares: bool = False,
    ):
        super().__init__()
        if score_mode not in (None, "logits", "probs"):
            raise ValueError(f"score_mode must be None, 'logits' or 'probs', got {score_mode!r}")
        self.name = name
        self.layers = nn.ModuleList(layers)
        self.first_layer = first_layer
        self.rotary = rotary
        self.num_kv_heads, self.head_dim, self.hidden_size = num_kv_heads, head_dim, hidden_size
        self.dtype = dtype
        self.score_mode = score_mode
        self.final = final
        self.image_tokens = image_tokens  # N0 of the model, and the image tokens alive in this stage
        self.alive = image_tokens if alive is None else alive
        # A plan of shares: `alive_share` of each image's tokens live here (all when None), whatever their count.
        self.alive_share, self.shares = alive_share, shares

    @property
    def layer_ids(self) -> list[int]:
        return list(range(self.first_layer, self.first_layer + len(self.layers)))

    def spec(self) -> GraphSpec:
        kv = (BATCH, self.num_kv_heads, PAST, self.head_dim)
        present = (BATCH, self.num_kv_heads, TOTAL, self.head_dim)
        inputs = [
            TensorSpec("inputs_embeds", self.dtype, (BATCH, SEQ, self.hidden_size)),
            TensorSpec("position_ids", torch.int64, self.rotary.position_dims),  # [B,T], or [3,B,T] for M-RoPE
            TensorSpec("attention_mask", torch.int64, (BATCH, TOTAL)),
        ]
        # The model's last stage hands only the last row to the head: its last layer computes nothing else.
        rows = 1 if self.final else SEQ
        outputs = [TensorSpec("hidden_states", self.dtype, (BATCH, rows, self.hidden_size))]
        for i in self.layer_ids:
            for kind in ("key", "value"):
                inputs.append(TensorSpec(past_name(i, kind), self.dtype, kv))
                outputs.append(TensorSpec(present_name(i, kind), self.dtype, present))
        if self.score_mode is not None:
            outputs.append(TensorSpec("scores", torch.float32, (BATCH, TOTAL)))
        phases = stage_phases(self.image_tokens, self.alive, self.alive_share, self.shares)
        return GraphSpec(self.name, tuple(inputs), tuple(outputs), phases)

    def forward(self, inputs_embeds, position_ids, attention_mask, *past_key_values):
        """See the class docstring; `past_key_values` alternates key, value per layer in layer order."""
        if len(past_key_values) != 2 * len(self.layers):
            raise ValueError(f"{self.name}: expected {2 * len(self.layers)} past tensors, got {len(past_key_values)}")
        x = inputs_embeds
        cos, sin = self.rotary(position_ids, x.dtype)  # [B,1,T,Dh]
        mask = additive_mask(attention_mask, x.shape[1])  # [B,1,1,T,S], computed once for all layers
        presents: list[torch.Tensor] = []
        scores = None
        last = len(self.layers) - 1
        for j, layer in enumerate(self.layers):
            mode = self.score_mode if j == last else None
            x, key, value, layer_scores = layer(
                x, cos, sin, mask, past_key_values[2 * j], past_key_values[2 * j + 1], mode, self.final and j == last
            )
            presents += [key, value]
            if layer_scores is not None:
                scores = layer_scores
        return (x, *presents) if scores is None else (x, *presents, scores)
