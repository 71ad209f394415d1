"""Draw what a pruned model kept: the input image with the surviving patches of each stage highlighted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from btp.runtime.errors import InputError

DIMMED = 0.15  # brightness left to a removed patch


def panel_size(grid: tuple[int, int], size: int) -> tuple[int, int]:
    """(height, width) in pixels of a panel of a `rows x cols` grid whose longer side is `size`: the grid's own
    aspect (Qwen2.5-VL resizes an image to its grid's aspect, so a 4x16-token image is four times as wide)."""
    rows, cols = grid
    if rows >= cols:
        return size, max(1, round(size * cols / rows))
    return max(1, round(size * rows / cols)), size


def image_grid(processor, image: Image.Image, nominal: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of image tokens the model sees for `image`: for a processor that resizes to the image's own
    grid of merged patches (Qwen2.5-VL: `image_grid_thw` over `merge_size`), that grid; else `nominal`."""
    ip = getattr(processor, "image_processor", processor)
    merge = getattr(ip, "merge_size", None)
    if merge is None:
        return nominal
    _, h, w = (int(v) for v in ip(images=[image.convert("RGB")], return_tensors="pt")["image_grid_thw"][0])
    return h // merge, w // merge


def kept_overlay(image: Image.Image, kept, grid: tuple[int, int], size: int = 256) -> np.ndarray:
    """`image` resized to `panel_size(grid, size)` as float RGB `[H,W,3]` in [0, 1], each removed patch dimmed to
    `DIMMED` of its brightness. `kept`: row-major grid positions (0..rows*cols-1); patch (r, c) covers pixel rows
    `[r*H/rows, (r+1)*H/rows)` and columns `[c*W/cols, (c+1)*W/cols)`."""
    rows, cols = grid
    idx = [int(i) for i in kept]
    if any(not 0 <= i < rows * cols for i in idx):
        raise InputError(f"kept indices must lie in the {rows}x{cols} grid (0..{rows * cols - 1}), got {idx}")
    h, w = panel_size(grid, size)
    base = np.asarray(image.convert("RGB").resize((w, h)), dtype=np.float32) / 255.0
    mask = np.zeros(rows * cols, dtype=np.float32)
    mask[idx] = 1.0
    up = mask.reshape(rows, cols)[np.arange(h) * rows // h][:, np.arange(w) * cols // w]  # [H,W]: pixel -> patch
    return base * (DIMMED + (1 - DIMMED) * up[..., None])


def explain_figure(image: Image.Image, kept: list[list[int]], grid: tuple[int, int], titles: list[str],
                   path: str | Path, size: int = 256) -> Path:
    """Save one panel per prune stage: `image` resized to the grid's aspect (longer side `size`), removed patches
    dimmed, kept ones intact. `kept[p]` are grid positions (row-major, 0..rows*cols-1) kept at stage `p`;
    `grid` (rows, cols) is the image's own grid (for Qwen2.5-VL, the grid of this image, not the nominal one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = grid
    h, w = panel_size(grid, size)
    panels = max(1, len(kept))
    fig, axes = plt.subplots(1, panels + 1, figsize=(2.6 * (panels + 1) * max(1.0, w / h) ** 0.5, 2.9),
                             squeeze=False)
    axes = axes[0]
    axes[0].imshow(kept_overlay(image, range(rows * cols), grid, size))
    axes[0].set_title(f"input ({rows}x{cols} patches)", fontsize=9)
    for ax, idx, title in zip(axes[1:], kept, titles):
        ax.imshow(kept_overlay(image, idx, grid, size))
        ax.set_title(f"{title}: {len(idx)} kept", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
