"""Draw what a pruned model kept: the input image with the surviving patches of each stage highlighted."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def explain_figure(image: Image.Image, kept: list[list[int]], grid: tuple[int, int], titles: list[str],
                   path: str | Path, size: int = 256) -> Path:
    """Save one panel per prune stage: `image` resized to `size`, removed patches dimmed, kept ones intact.

    `kept[p]` are grid positions (row-major, 0..rows*cols-1) kept at stage `p`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, cols = grid
    base = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0
    panels = max(1, len(kept))
    fig, axes = plt.subplots(1, panels + 1, figsize=(2.6 * (panels + 1), 2.9), squeeze=False)
    axes = axes[0]
    axes[0].imshow(base)
    axes[0].set_title(f"input ({rows * cols} patches)", fontsize=9)
    for ax, idx, title in zip(axes[1:], kept, titles):
        mask = np.zeros(rows * cols, dtype=np.float32)
        mask[list(idx)] = 1.0
        up = np.kron(mask.reshape(rows, cols), np.ones((size // rows + 1, size // cols + 1)))[:size, :size]
        ax.imshow(base * (0.15 + 0.85 * up[..., None]))
        ax.set_title(f"{title}: {len(idx)} kept", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
