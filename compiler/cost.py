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
