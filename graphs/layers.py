"""Explicit, export-friendly building blocks of a Llama-style decoder that borrow Hugging Face parameters.

Every block writes its forward out (gpt-fast style): no Hugging Face `Cache`, no attention implementation
asked for probabilities. fp32 islands: RMSNorm statistics, rotary tables, softmax and scores.
"""

from __future__ import annotations

import torch
from torch import nn

from .spec import BATCH, SEQ

# Finite large negative for masked logits: TensorRT and fp16 never see -inf (ARCHITECTURE section 3).
MASK_VALUE = -1.0e9


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with fp32 statistics; `x [..., D]` -> `[..., D]` in `x.dtype`."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class RotaryTable(nn.Module):
    """Precomputed fp32 cos/sin tables `[max_positions, Dh]`, indexed by position ids (never rebuilt)."""

    position_dims: tuple = (BATCH, SEQ)  # the stage graphs' `position_ids` shape

    def __init__(self, inv_freq: torch.Tensor, max_positions: int, scaling: float = 1.0):
        super().__init__()
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq.float()[None, :]  # [P, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, Dh]
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`position_ids [B,T]` int64 -> cos, sin `[B,1,T,Dh]` in `dtype` (broadcast over heads)."""
        return self.cos[position_ids].unsqueeze(1).to(dtype), self.sin[position_ids].unsqueeze(1).to(dtype)


class MRotaryTable(RotaryTable):
    """M-RoPE (Qwen2-VL): the same tables indexed by three position rows (temporal, height, width); frequency
    channel `d` takes its angle from row `rows[d]`, the `mrope_section` chunks cycling t, h, w (both halves)."""

    position_dims = (3, BATCH, SEQ)

    def __init__(self, inv_freq: torch.Tensor, max_positions: int, mrope_section, scaling: float = 1.0):
        super().__init__(inv_freq, max_positions, scaling)
        half = [i % 3 for i, width in enumerate(mrope_section) for _ in range(width)]  # [Dh/2]
        if len(half) != inv_freq.numel():
            raise ValueError(f"mrope_section {list(mrope_section)} sums to {len(half)}, expected {inv_freq.numel()}")
        self.register_buffer("rows", torch.tensor(half + half)[None, None, None, :], persistent=False)  # [1,1,1,Dh]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`position_ids [3,B,T]` int64 -> cos, sin `[B,1,T,Dh]` in `dtype`."""
        rows = self.rows.expand(1, position_ids.shape[1], position_ids.shape[2], -1)  # [1,B,T,Dh]
        cos = self.cos[position_ids].gather(0, rows)  # [3,B,T,Dh] -> [1,B,T,Dh]
        sin = self.sin[position_ids].gather(0, rows)
        return cos.transpose(0, 1).to(dtype), sin.transpose(0, 1).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x [B,H,T,Dh]`, cos/sin `[B,1,T,Dh]` -> `[B,H,T,Dh]`."""
    return x * cos + rotate_half(x) * sin


def additive_mask(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """Causal + padding mask for `seq` new queries over `S` keys (the last `seq` of them are new).

    `attention_mask [B,S]` (1 = attend, 0 = padding or removed) -> fp32 `[B,1,1,seq,S]`, 0 or MASK_VALUE.
    """
    total = attention_mask.shape[1]
    key_pos = torch.arange(total, device=attention_mask.device)  # [S]
    query_pos = torch.arange(seq, device=attention_mask.device) + (total - seq)  # [T]
    allowed = (key_pos[None, :] <= query_pos[:, None])[None] & (attention_mask[:, None, :] > 0)  # [B,T,S]
    zero = torch.zeros((), dtype=torch.float32, device=attention_mask.device)
    neg = torch.full((), MASK_VALUE, dtype=torch.float32, device=attention_mask.device)
    return torch.where(allowed, zero, neg)[:, None, None]


class Attention(nn.Module):
    """Grouped-query self-attention with explicit past/present KV, borrowing an HF attention's projections."""

    def __init__(self, hf_attn: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.q_proj, self.k_proj = hf_attn.q_proj, hf_attn.k_proj
        self.v_proj, self.o_proj = hf_attn.v_proj, hf_attn.o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.groups = num_heads // num_kv_heads
        self.scale = head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        score_mode: str | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`x [B,T,D]`, mask `[B,1,1,T,S]`, past `[B,Hkv,P,Dh]` -> out `[B,T,D]`, present k/v `[B,Hkv,S,Dh]`,
        and with `score_mode` ("logits" | "probs") the head-mean attention of the last query, fp32 `[B,S]`.

        `last_only` attends with the last query row alone (out `[B,1,D]`) while keys and values still cover
        every token: the model's final layer, whose other rows nothing reads."""
        b, t, _ = x.shape
        hkv, g, dh = self.num_kv_heads, self.groups, self.head_dim
        k = self.k_proj(x).view(b, t, hkv, dh).transpose(1, 2)  # [B,Hkv,T,Dh]
        v = self.v_proj(x).view(b, t, hkv, dh).transpose(1, 2)
        k = apply_rotary(k, cos, sin)
        if last_only:
            x, cos, sin, mask = x[:, -1:], cos[:, :, -1:], sin[:, :, -1:], mask[..., -1:, :]
            t = 1
        # Queries are laid out under their KV head, [B,Hkv,G,T,Dh]: K and V are broadcast, never repeated.
        q = self.q_proj(x).view(b, t, hkv, g, dh).permute(0, 2, 3, 1, 4)
        q = apply_rotary(q, cos[:, None], sin[:, None])
        key = torch.cat((past_key, k), dim=2)  # [B,Hkv,S,Dh]
        value = torch.cat((past_value, v), dim=2)

        logits = torch.matmul(q, key[:, :, None].transpose(3, 4)).float() * self.scale  # [B,Hkv,G,T,S]
        probs = torch.softmax(logits + mask, dim=-1).to(x.dtype)
        out = torch.matmul(probs, value[:, :, None])  # [B,Hkv,G,T,Dh]
        out = out.permute(0, 3, 1, 2, 4).reshape(b, t, self.num_heads * dh)

        scores = None
        if score_mode is not None:
            scores = self._scores(q[:, :, :, -1:], key, mask[..., -1:, :], score_mode)
        return self.o_proj(out), key, value, scores

    def _scores(self, q_last: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
        """Side computation beside the attention: last query row `[B,Hkv,G,1,Dh]` -> fp32 `[B,S]`."""
        # An fp32 island: one query row, so computing it in fp32 costs nothing and cannot overflow.
        logits = torch.matmul(q_last.float() * self.scale, key[:, :, None].transpose(3, 4).float())  # [B,Hkv,G,1,S]
        if mode == "probs":
            logits = torch.softmax(logits + mask, dim=-1)
        return logits.flatten(1, 3).mean(dim=1)  # [B,S]


class MLP(nn.Module):
    """SwiGLU MLP borrowing an HF MLP's projections: `[B,T,D]` -> `[B,T,D]`."""

    def __init__(self, hf_mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = hf_mlp.gate_proj, hf_mlp.up_proj, hf_mlp.down_proj
        self.act = hf_mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer (Llama/Mistral/Vicuna) over an HF `LlamaDecoderLayer`-like module."""

    def __init__(self, hf_layer: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.input_norm = RMSNorm(hf_layer.input_layernorm.weight, eps)
        self.attn = Attention(hf_layer.self_attn, num_heads, num_kv_heads, head_dim)
        self.post_norm = RMSNorm(hf_layer.post_attention_layernorm.weight, eps)
        self.mlp = MLP(hf_layer.mlp)

    def forward(self, x, cos, sin, mask, past_key, past_value, score_mode=None, last_only=False):
        """`x [B,T,D]` -> `x [B,T,D]` (`[B,1,D]` with `last_only`), present k/v `[B,Hkv,S,Dh]`, scores fp32
        `[B,S]` or None."""
        h, key, value, scores = self.attn(self.input_norm(x), cos, sin, mask, past_key, past_value, score_mode,
                                          last_only)
        if last_only:
            x = x[:, -1:]
        x = x + h
        x = x + self.mlp(self.post_norm(x))
        return x, key, value, scores
