"""`HeadGraph`: final norm and LM head on the last position."""

from __future__ import annotations

import torch
from torch import nn

from .layers import RMSNorm
from .spec import BATCH, SEQ, GraphSpec, TensorSpec


class HeadGraph(nn.Module):
    """`hidden_states [B,T,D]` -> `logits [B,V]` fp32 for the last position (left padding keeps it real)."""

    def __init__(self, norm: RMSNorm, lm_head: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.norm, self.lm_head, self.dtype = norm, lm_head, dtype

    def spec(self) -> GraphSpec:
        return GraphSpec(
            "head",
            (TensorSpec("hidden_states", self.dtype, (BATCH, SEQ, self.lm_head.in_features)),),
            (TensorSpec("logits", torch.float32, (BATCH, self.lm_head.out_features)),),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden_states[:, -1])).float()
