"""`HeadGraph`: final norm and LM head on the one row the model's last stage hands over."""

from __future__ import annotations

import torch
from torch import nn

from .layers import RMSNorm
from .spec import BATCH, GraphSpec, TensorSpec


class HeadGraph(nn.Module):
    """`hidden_states [B,1,D]` (the last position, which the final stage alone computes; left padding keeps it
    real) -> `logits [B,V]` fp32.

    The row dim is a static 1 and the graph reads row 0: TensorRT documents a negative Gather index on a dynamic
    axis (the former `hidden_states[:, -1]` over `[B,T,D]`) as undefined.
    """

    def __init__(self, norm: RMSNorm, lm_head: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.norm, self.lm_head, self.dtype = norm, lm_head, dtype
        # A chain whose last stage hands over every row (calibration's per-layer chain, never exported) sets this:
        # the head then reads the last row of `[B,T,D]`.
        self.all_rows = False

    def spec(self) -> GraphSpec:
        return GraphSpec(
            "head",
            (TensorSpec("hidden_states", self.dtype, (BATCH, 1, self.lm_head.in_features)),),
            (TensorSpec("logits", torch.float32, (BATCH, self.lm_head.out_features)),),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        row = hidden_states[:, -1] if self.all_rows else hidden_states[:, 0]
        return self.lm_head(self.norm(row)).float()
