"""Host-side inputs of the Qwen2.5-VL graphs, computed from the image grid as Hugging Face computes them.

Pure torch and `btp.runtime` (no transformers, no graphs), so that it can move into the runtime as it is once an
artifact of this family runs there: the runtime's `Pipeline` needs these inputs at run time.
"""

from __future__ import annotations

import torch

from btp.runtime import InputError, Inputs
from btp.runtime import names as n


def vision_feeds(grid_h: int, grid_w: int, merge: int, window: int) -> dict[str, torch.Tensor]:
    """One image of `grid_h x grid_w` patches (`merge x merge` patches per image token, windows of `window` image
    tokens a side) -> the vision graph's per-size inputs: `vision_position_ids [S,2]`, `window_index [N]`,
    `window_inverse [N]`, `window_ids [S]` (int64; S = grid_h * grid_w, N = S / merge**2).

    As transformers' `get_vision_position_ids` and `get_vision_window_index`: positions merge-block-major; merge
    blocks ordered window by window (windows row-major, blocks row-major inside), windows cut from the top left."""
    gh, gw = grid_h // merge, grid_w // merge
    rows = torch.arange(grid_h)[:, None].expand(grid_h, grid_w)
    cols = torch.arange(grid_w)[None, :].expand(grid_h, grid_w)
    block_major = lambda a: a.reshape(gh, merge, gw, merge).transpose(1, 2).flatten()  # noqa: E731
    positions = torch.stack((block_major(rows), block_major(cols)), dim=-1)  # [S,2]
    across = -(-gw // window)  # windows per row
    win = ((torch.arange(gh)[:, None] // window) * across + torch.arange(gw)[None, :] // window).flatten()  # [N]
    index = torch.sort(win, stable=True).indices  # [N]
    return {n.VISION_POSITION_IDS: positions, n.WINDOW_INDEX: index, n.WINDOW_INVERSE: torch.argsort(index),
            n.WINDOW_IDS: win[index].repeat_interleave(merge * merge)}


def mrope_positions(attention_mask: torch.Tensor, image_start: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """M-RoPE position ids `[3,B,T]` int64 (temporal, height, width) of left-padded rows holding one image of
    `gh x gw` tokens at `image_start [B]`, as `get_rope_index`: text counts up from 0; the image's tokens sit at
    (s, s + row, s + column) after the s tokens before it; the text after it continues from s + max(gh, gw);
    padding gets 0. `attention_mask [B,T]` int64."""
    real = attention_mask.cumsum(-1) - 1  # [B,T] index among the row's real tokens
    k = torch.arange(attention_mask.shape[1])[None, :] - image_start[:, None]  # [B,T] offset into the image span
    s = real.gather(1, image_start[:, None])  # [B,1]
    inside = (k >= 0) & (k < gh * gw)
    text = torch.where(k >= gh * gw, real - gh * gw + max(gh, gw), real)
    rows = (torch.where(inside, s, text), torch.where(inside, s + k // gw, text), torch.where(inside, s + k % gw, text))
    return torch.stack(rows) * attention_mask[None]  # [3,B,T]


def prepare(pipe, images, prompts, merge: int, window: int) -> Inputs:
    """`Pipeline.prepare` for Qwen2.5-VL: the processor's output checked (one image size per batch, one image
    span per row), `pixel_values [B,S,C*Tp*P*P]`, M-RoPE `position_ids [3,B,T]` and the vision feeds."""
    enc = pipe.encode(images, prompts)
    ids, mask = enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)
    grids = enc["image_grid_thw"]  # [B,3]
    if bool((grids != grids[0]).any()):
        raise InputError(f"the images of one batch must have one size after resizing, got grids {grids.tolist()}")
    t, h, w = (int(v) for v in grids[0])
    if t != 1:
        raise InputError(f"expected still images (one temporal patch), got a grid of {t} frames")
    start = pipe.image_span(ids, h * w // merge**2)
    pixels = enc["pixel_values"].reshape(ids.shape[0], h * w, -1)  # [B,S,C*Tp*P*P]: the processor's patch rows
    positions = mrope_positions(mask, start, h // merge, w // merge)
    dev = pipe.device
    feeds = {k: v.to(dev) for k, v in vision_feeds(h, w, merge, window).items()}
    return Inputs(ids.to(dev), mask.to(dev), pixels.to(dev, pipe.spec.torch_dtype), start.to(dev), positions.to(dev),
                  feeds)
