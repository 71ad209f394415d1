"""`VisionGraph`: CLIP-style vision tower up to the feature layer, CLS drop, and the multimodal projector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .spec import BATCH, GraphSpec, TensorSpec


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention borrowing an HF CLIP attention: `[B,S,C]` -> `[B,S,C]`."""

    def __init__(self, hf_attn: nn.Module, num_heads: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = hf_attn.q_proj, hf_attn.k_proj, hf_attn.v_proj
        self.out_proj = hf_attn.out_proj
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        dh = c // self.num_heads
        q = self.q_proj(x).view(b, s, self.num_heads, dh).transpose(1, 2)  # [B,H,S,Dh]
        k = self.k_proj(x).view(b, s, self.num_heads, dh).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_heads, dh).transpose(1, 2)
        logits = torch.matmul(q, k.transpose(2, 3)).float() * dh**-0.5
        probs = torch.softmax(logits, dim=-1).to(x.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, c)
        return self.out_proj(out)


class VisionLayer(nn.Module):
    """Pre-LayerNorm encoder layer over an HF `CLIPEncoderLayer`-like module."""

    def __init__(self, hf_layer: nn.Module, num_heads: int):
        super().__init__()
        self.norm1, self.norm2 = hf_layer.layer_norm1, hf_layer.layer_norm2
        self.attn = VisionAttention(hf_layer.self_attn, num_heads)
        self.fc1, self.fc2, self.act = hf_layer.mlp.fc1, hf_layer.mlp.fc2, hf_layer.mlp.activation_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(_layer_norm(self.norm1, x))
        return x + self.fc2(self.act(self.fc1(_layer_norm(self.norm2, x))))


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm with fp32 statistics (an fp32 island), result in `x.dtype`."""
    w = norm.weight.float()
    b = norm.bias.float() if norm.bias is not None else None
    return F.layer_norm(x.float(), norm.normalized_shape, w, b, norm.eps).to(x.dtype)


class VisionGraph(nn.Module):
    """`pixel_values [B,3,H,W]` -> `image_features [B,N0,D]` (text width D, CLS dropped when asked).

    Runs the HF CLIP vision tower's embeddings, pre-norm and the first `feature_layers` encoder layers
    (the hidden state the LLaVA config selects), then the projector (linear, act, linear).
    """

    def __init__(
        self,
        hf_tower: nn.Module,
        hf_projector: nn.Module,
        feature_layers: int,
        num_heads: int,
        drop_cls: bool,
        image_size: int,
        image_tokens: int,
        hidden_size: int,
        dtype: torch.dtype,
    ):
        super().__init__()
        tower = getattr(hf_tower, "vision_model", hf_tower)
        emb = tower.embeddings
        self.patch = emb.patch_embedding
        self.class_embedding = emb.class_embedding
        self.position_embedding = emb.position_embedding  # [1+N, C] table, one row per position
        self.pre_norm = tower.pre_layrnorm
        self.layers = nn.ModuleList(VisionLayer(tower.encoder.layers[i], num_heads) for i in range(feature_layers))
        self.proj1, self.proj_act, self.proj2 = hf_projector.linear_1, hf_projector.act, hf_projector.linear_2
        self.drop_cls = drop_cls
        self.image_size, self.image_tokens, self.hidden_size, self.dtype = image_size, image_tokens, hidden_size, dtype

    def spec(self) -> GraphSpec:
        return GraphSpec(
            "vision",
            (TensorSpec("pixel_values", self.dtype, (BATCH, 3, self.image_size, self.image_size)),),
            (TensorSpec("image_features", self.dtype, (BATCH, self.image_tokens, self.hidden_size)),),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixel_values.to(self.patch.weight.dtype)).flatten(2).transpose(1, 2)  # [B,N,C]
        cls = self.class_embedding.to(x.dtype)[None, None, :].expand(x.shape[0], 1, -1)
        x = torch.cat((cls, x), dim=1) + self.position_embedding.weight.to(x.dtype)[None]  # [B,1+N,C]
        x = _layer_norm(self.pre_norm, x)
        for layer in self.layers:
            x = layer(x)
        if self.drop_cls:
            x = x[:, 1:]
        return self.proj2(self.proj_act(self.proj1(x)))  # [B,N0,D]
