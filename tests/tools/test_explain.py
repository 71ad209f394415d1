"""The kept-patch figure of `--explain` on square and non-square grids."""

import numpy as np
import pytest
from PIL import Image

from btp.runtime.errors import InputError
from btp.tools.explain import DIMMED, explain_figure, image_grid, kept_overlay, panel_size

WHITE = Image.new("RGB", (300, 100), "white")


def _cell_values(overlay, grid):
    """Per patch, the set of brightness values its pixels take."""
    rows, cols = grid
    h, w, _ = overlay.shape
    y = [-(-r * h // rows) for r in range(rows + 1)]  # patch r: pixel rows [r h / rows, (r+1) h / rows)
    x = [-(-c * w // cols) for c in range(cols + 1)]
    return {(r, c): set(np.unique(overlay[y[r]:y[r + 1], x[c]:x[c + 1]].astype(np.float64).round(4)).tolist())
            for r in range(rows) for c in range(cols)}


@pytest.mark.parametrize(("grid", "size", "shape"), [((4, 16), 256, (64, 256)), ((16, 4), 256, (256, 64)),
                                                     ((8, 8), 256, (256, 256)), ((3, 7), 100, (43, 100))])
def test_each_patch_of_a_non_square_grid_is_its_own_block_of_pixels(grid, size, shape):
    rows, cols = grid
    kept = [0, cols + 1, rows * cols - 1, cols - 1]  # top left, (1, 1), bottom right, top right
    overlay = kept_overlay(WHITE, kept, grid, size)
    assert overlay.shape == (*shape, 3) and panel_size(grid, size) == shape
    cells = _cell_values(overlay, grid)
    for (r, c), values in cells.items():
        assert values == ({1.0} if r * cols + c in kept else {DIMMED}), (r, c, values)
    # Every pixel belongs to exactly one patch: the kept share of the pixels is the kept share of the patches
    # (up to the rounding of patch edges to pixels).
    share = float((overlay[..., 0] > 0.5).mean())
    assert abs(share - len(kept) / (rows * cols)) < 1.5 * max(rows / shape[0], cols / shape[1])


def test_a_4x16_figure_renders_one_panel_per_stage_in_the_grids_aspect(tmp_path):
    image = Image.linear_gradient("L").resize((448, 112)).convert("RGB")
    out = explain_figure(image, [list(range(0, 64, 2)), [5, 40]], (4, 16), ["prune0", "prune1"], tmp_path / "k.png")
    with Image.open(out) as im:
        assert im.width > 3 * im.height  # three panels, each four times as wide as tall
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # drawn, not blank


def test_kept_index_outside_the_grid_is_a_one_line_input_error():
    with pytest.raises(InputError, match=r"4x16 grid \(0\.\.63\), got \[0, 64\]"):
        kept_overlay(WHITE, [0, 64], (4, 16))


def test_the_grid_of_a_qwen_image_is_its_own_and_a_llava_image_the_nominal_one(tiny_qwen, tiny):
    wide = Image.linear_gradient("L").resize((448, 112)).convert("RGB")
    assert image_grid(tiny_qwen.processor, wide, tiny_qwen.grid) == (4, 16)
    assert image_grid(tiny_qwen.processor, wide.resize((112, 448)), tiny_qwen.grid) == (16, 4)
    assert image_grid(tiny.processor, wide, tiny.grid) == tiny.grid
