"""Qwen2.5-VL's inputs, computed on the host from each image's grid as Hugging Face computes them: M-RoPE
`position_ids [3,B,T]` and the vision graph's window index, its inverse, window ids and rotary positions."""

from __future__ import annotations

import importlib

import torch

from . import names as n
from .errors import InputError
from .inputs import Inputs


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


def prepare(pipe, images, prompts) -> Inputs:
    """`Pipeline.prepare` for Qwen2.5-VL: the processor's output checked (one image size per batch, one image
    span per row), `pixel_values [B,S,C*Tp*P*P]`, M-RoPE `position_ids [3,B,T]` and the vision feeds."""
    merge, window = pipe.spec.spatial_merge, pipe.spec.window_tokens
    enc = pipe.encode(images, prompts)
    ids, mask = enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)
    grids = enc["image_grid_thw"]  # [B,3]
    if bool((grids != grids[0]).any()):
        raise InputError(f"the images of one batch must have one size after resizing, got grids {grids.tolist()}")
    t, h, w = (int(v) for v in grids[0])
    if t != 1:
        raise InputError(f"expected still images (one temporal patch), got a grid of {t} frames")
    n0 = h * w // merge**2
    start = pipe.image_span(ids, n0)
    pixels = enc["pixel_values"].reshape(ids.shape[0], h * w, -1)  # [B,S,C*Tp*P*P]: the processor's patch rows
    positions = mrope_positions(mask, start, h // merge, w // merge)
    dev = pipe.device
    feeds = {k: v.to(dev) for k, v in vision_feeds(h, w, merge, window).items()}
    return Inputs(ids.to(dev), mask.to(dev), pixels.to(dev, pipe.spec.torch_dtype), start.to(dev), positions.to(dev),
                  feeds, n0)


def image_grids(pipe, images) -> list[tuple[int, int] | None]:
    """Each image's grid of image tokens (rows, columns) once the processor resizes it, from its size alone (the
    image processor's own `smart_resize`; no pixels touched); None where the size cannot be read."""
    ip = pipe.processor.image_processor
    resize, cell, out = importlib.import_module(type(ip).__module__).smart_resize, ip.patch_size * ip.merge_size, []
    for image in images:
        shape = tuple(getattr(image, "shape", ())) or (getattr(image, "height", 0), getattr(image, "width", 0))  # PIL
        hw = shape[1:] if len(shape) == 3 and shape[0] in (1, 3) else shape[:2]  # arrays: channels first if 1 or 3,
        try:  # as transformers infers the layout
            out.append(tuple(x // cell for x in resize(*hw, cell, ip.size["shortest_edge"], ip.size["longest_edge"])))
        except (TypeError, ValueError, ZeroDivisionError):  # no size; an aspect ratio smart_resize refuses
            out.append(None)
    return out
