"""`QwenVisionGraph`: the Qwen2.5-VL vision tower (windowed and full attention, 2D rotary) and patch merger.

Everything that depends on the image's size and is data-dependent in Hugging Face (`cu_seqlens`, the window
index, the rotary position ids) is computed on the host from `image_grid_thw` and fed in, so the graph has no
data-dependent shapes. Rows of one batch share the image size (the runtime groups rows by image-token count).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import MASK_VALUE, MLP, RMSNorm, rotate_half
from .spec import BATCH, IMAGES, PATCHES, GraphSpec, TensorSpec, patch_phases


class QwenVisionAttention(nn.Module):
    """Bidirectional attention over an HF `Qwen2_5_VLVisionAttention` (fused qkv): `x [B,S,C]`, rotary cos/sin
    `[S,Dh]` fp32, optional additive mask `[S,S]` fp32 -> `[B,S,C]`."""

    def __init__(self, hf_attn: nn.Module, num_heads: int):
        super().__init__()
        self.qkv, self.proj, self.num_heads = hf_attn.qkv, hf_attn.proj, num_heads

    def forward(self, x, cos, sin, mask: torch.Tensor | None):
        b, s, c = x.shape
        dh = c // self.num_heads
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, dh).unbind(2)  # [B,S,H,Dh] each
        cos, sin = cos[:, None], sin[:, None]  # [S,1,Dh]: broadcast over heads; rotary in fp32 as HF does
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype).transpose(1, 2)  # [B,H,S,Dh]
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype).transpose(1, 2)
        logits = torch.matmul(q, k.transpose(2, 3)) * dh**-0.5  # [B,H,S,S]
        if mask is not None:
            logits = logits + mask
        probs = torch.softmax(logits.float(), dim=-1).to(x.dtype)
        out = torch.matmul(probs, v.transpose(1, 2)).transpose(1, 2).reshape(b, s, c)
        return self.proj(out)


class QwenVisionBlock(nn.Module):
    """Pre-RMSNorm ViT block over an HF `Qwen2_5_VLVisionBlock`; `full` blocks attend across the whole image,
    the others only inside their window."""

    def __init__(self, hf_block: nn.Module, num_heads: int, full: bool):
        super().__init__()
        self.norm1 = RMSNorm(hf_block.norm1.weight, hf_block.norm1.variance_epsilon)
        self.norm2 = RMSNorm(hf_block.norm2.weight, hf_block.norm2.variance_epsilon)
        self.attn = QwenVisionAttention(hf_block.attn, num_heads)
        self.mlp = MLP(hf_block.mlp)
        self.full = full

    def forward(self, x, cos, sin, window_mask):
        x = x + self.attn(self.norm1(x), cos, sin, None if self.full else window_mask)
        return x + self.mlp(self.norm2(x))


class QwenVisionGraph(nn.Module):
    """Flattened patches of B same-size images -> `image_features [B,N,D]` in the text model's width.

    Inputs: `pixel_values [B,S,C*Tp*P*P]` (the processor's patches of each image, `S = unit * N`),
    `vision_position_ids [S,2]` int64 (row and column of each patch, merge-block-major, as HF's
    `get_vision_position_ids`), `window_index [N]` int64 (merge blocks in window order, HF's
    `get_vision_window_index`), `window_inverse [N]` int64 (its argsort), `window_ids [S]` int64 (the window of
    each patch in window order: `cu_window_seqlens` as a mask, `[S,S]` built in the graph).
    """

    def __init__(self, visual: nn.Module, dtype: torch.dtype, hidden_size: int, tokens: tuple[int, int]):
        super().__init__()
        cfg = visual.config
        self.patch = visual.patch_embed.proj  # Conv3d, kernel = stride = (Tp, P, P)
        self.patch_shape = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.register_buffer("inv_freq", visual.rotary_pos_emb.inv_freq.float().clone(), persistent=False)
        full = set(cfg.fullatt_block_indexes)
        self.blocks = nn.ModuleList(QwenVisionBlock(b, cfg.num_heads, i in full) for i, b in enumerate(visual.blocks))
        merger = visual.merger
        self.merge_norm = RMSNorm(merger.ln_q.weight, merger.ln_q.variance_epsilon)
        self.merge1, self.merge_act, self.merge2 = merger.mlp[0], merger.mlp[1], merger.mlp[2]
        self.unit = cfg.spatial_merge_size**2
        self.dtype, self.hidden_size, self.tokens = dtype, hidden_size, tokens

    def spec(self) -> GraphSpec:
        width = 1
        for d in self.patch_shape:
            width *= d
        return GraphSpec(
            "vision",
            (TensorSpec("pixel_values", self.dtype, (BATCH, PATCHES, width)),
             TensorSpec("vision_position_ids", torch.int64, (PATCHES, 2)),
             TensorSpec("window_index", torch.int64, (IMAGES,)),
             TensorSpec("window_inverse", torch.int64, (IMAGES,)),
             TensorSpec("window_ids", torch.int64, (PATCHES,))),
            (TensorSpec("image_features", self.dtype, (BATCH, IMAGES, self.hidden_size)),),
            patch_phases(*self.tokens, self.unit),
        )

    def forward(self, pixel_values, vision_position_ids, window_index, window_inverse, window_ids):
        b, s, _ = pixel_values.shape
        n = window_index.shape[0]
        x = self.patch(pixel_values.reshape(b * s, *self.patch_shape).to(self.patch.weight.dtype))
        x = x.reshape(b, s, -1)  # [B,S,C]
        c = x.shape[2]
        x = x.reshape(b, n, self.unit, c)[:, window_index].reshape(b, s, c)  # patches in window order
        freqs = (vision_position_ids[:, :, None].float() * self.inv_freq).flatten(1)  # [S,Dh/2]: rows, then columns
        emb = torch.cat((freqs, freqs), dim=-1).reshape(n, self.unit, -1)[window_index].reshape(s, -1)  # [S,Dh]
        cos, sin = emb.cos(), emb.sin()
        same = window_ids[:, None] == window_ids[None, :]  # [S,S]
        window_mask = torch.where(same, torch.zeros((), device=x.device), torch.full((), MASK_VALUE, device=x.device))
        for block in self.blocks:
            x = block(x, cos, sin, window_mask)
        x = self.merge_norm(x).reshape(b, n, self.unit * c)  # [B,N,unit*C]: one merge block per row
        x = self.merge2(self.merge_act(self.merge1(x)))  # [B,N,D]
        return x[:, window_inverse]
