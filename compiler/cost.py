"""The cost model of BTP.md section 5: FLOPs of a decoder layer and of the vision tower."""

from __future__ import annotations


def decoder_flops(tokens: int, hidden_size: int, intermediate_size: int) -> float:
    """FLOPs of one decoder layer over `tokens` tokens: `4 n d^2 + 2 n^2 d + 3 n d m` (the paper's formula)."""
    n, d, m = tokens, hidden_size, intermediate_size
    return 4.0 * n * d * d + 2.0 * n * n * d + 3.0 * n * d * m


def vision_flops(patches: int, width: int, mlp_width: int, layers: int, patch_pixels: int, text_width: int,
                 cls_token: bool = True) -> float:
    """FLOPs of the CLIP-style tower and projector in the same multiply-accumulate units as `decoder_flops`.

    Patch embedding `N C p^2 d`, `layers` encoder layers over `N (+1)` tokens (`4 n d^2 + 2 n^2 d + 2 n d m`),
    and the two-layer projector `N (d D + D^2)`. The part of the prefill that pruning never touches.
    """
    n = patches + (1 if cls_token else 0)
    d, m = width, mlp_width
    encoder = layers * (4.0 * n * d * d + 2.0 * n * n * d + 2.0 * n * d * m)
    return patches * patch_pixels * d + encoder + patches * (d * text_width + text_width * text_width)


def window_lengths(rows: int, cols: int, window: int) -> list[int]:
    """Merged tokens in each attention window of a `rows x cols` merged-token image: the grid cut into
    `window x window` tiles from the top left, edge tiles partial (Hugging Face's `get_window_index`)."""
    return [min(window, rows - r) * min(window, cols - c)
            for r in range(0, rows, window) for c in range(0, cols, window)]


def qwen_vision_flops(grid: tuple[int, int, int], width: int, mlp_width: int, layers: int, full_layers: int,
                      patch_pixels: int, merge: int, window: int, text_width: int) -> float:
    """FLOPs of Qwen2.5-VL's ViT and patch merger over one image of `grid` = (t, h, w) patches, in the units of
    `decoder_flops`.

    Patch embedding `S C Tp p^2 d` over `S = t h w` patches; per block `4 S d^2` (qkv, proj) and `3 S d m` (SwiGLU
    MLP), attention `2 L^2 d` per window of `L` patches (`window` merged tokens a side, `merge^2` patches each),
    or per frame (`L = h w`) in the `full_layers` blocks; the merger `S/merge^2` rows of `(d merge^2)^2` and
    `d merge^2 D`. The part of the prefill that pruning never touches.
    """
    t, h, w = grid
    s, d, m, u = t * h * w, width, mlp_width, merge * merge
    windowed = t * sum((u * n) ** 2 for n in window_lengths(h // merge, w // merge, window))
    attention = 2.0 * d * (full_layers * t * (h * w) ** 2 + (layers - full_layers) * windowed)
    encoder = layers * (4.0 * s * d * d + 3.0 * s * d * m) + attention
    merger = s // u * ((d * u) ** 2 + d * u * text_width)
    return float(s * patch_pixels * d) + encoder + merger
