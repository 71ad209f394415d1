"""What the pipeline takes (image sizes bounded from the header, high-bit-depth images scaled, prompts that are text)
and `Inputs`, what `prepare` makes of it. `MAX_IMAGE_PIXELS` and `MAX_ASPECT_RATIO` may be set to change the bounds."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import InputError

# Images larger or more elongated than this are refused before any resize: a processor that scales the shortest
# edge to its input size turns a 100000x1 image of a few hundred bytes into gigabytes.
MAX_IMAGE_PIXELS = 64_000_000
MAX_ASPECT_RATIO = 20.0


@dataclass
class Inputs:
    """Model inputs of one batch, as `Pipeline.prepare` makes them."""

    input_ids: torch.Tensor  # [B,T] int64, left padded
    attention_mask: torch.Tensor  # [B,T] int64
    pixel_values: torch.Tensor  # [B,3,H,W] (a family's own layout where its vision graph says so)
    image_start: torch.Tensor  # [B] int64
    position_ids: torch.Tensor | None = None  # [3,B,T] int64 for M-RoPE; None: [B,T] counted from the mask
    vision: dict[str, torch.Tensor] = field(default_factory=dict)  # the vision graph's other feeds, by name
    image_tokens: int = 0  # N0, every row's image tokens; 0: the chain's fixed `spec.image_tokens`


def check_image_size(size, what: str = "image") -> None:
    """`InputError` for an image `size` (width, height) that is empty, over `MAX_IMAGE_PIXELS` or more elongated
    than `MAX_ASPECT_RATIO`."""
    w, h = size
    if w < 1 or h < 1:
        raise InputError(f"{what}: expected a non-empty image, got {w}x{h}")
    if w * h > MAX_IMAGE_PIXELS:
        raise InputError(f"{what}: {w}x{h} is {w * h} pixels, more than the {MAX_IMAGE_PIXELS} accepted "
                         "(btp.runtime.inputs.MAX_IMAGE_PIXELS)")
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise InputError(f"{what}: {w}x{h} has an aspect ratio of {max(w, h) / min(w, h):.0f}:1, more than the "
                         f"{MAX_ASPECT_RATIO:g}:1 accepted (btp.runtime.inputs.MAX_ASPECT_RATIO)")


def to_rgb(image):
    """An RGB PIL image of `image` with high-bit-depth gray scaled, not saturated (Pillow's `convert("RGB")`
    clips it to white): 16-bit modes (`I;16*`) map 0..65535 to 0..255; 32-bit `I` does the same when its values
    lie in 0..65535 (Pillow opens 16-bit PNGs as `I;16` or `I` depending on its version), else maps its min..max
    to 0..255; float `F` is scaled by 255 when it lies in 0..1, else clipped to 0..255. Other modes convert as
    Pillow does. Always a new image."""
    import numpy as np
    from PIL import Image

    mode = image.mode
    if not (mode.startswith("I") or mode == "F"):
        return image.convert("RGB")
    a = np.asarray(image)
    if mode == "F":
        a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        gray = a * 255 if a.size and a.min() >= 0 and a.max() <= 1 else a
        gray = np.clip(np.rint(gray), 0, 255)
    else:
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo >= 0 and hi <= 65535:  # 16-bit data, whatever container Pillow chose
            gray = (a.astype(np.uint32) * 255 + 32767) // 65535
        else:
            gray = np.rint((a.astype(np.float32) - lo) * (255 / max(hi - lo, 1)))
    return Image.fromarray(gray.astype(np.uint8)).convert("RGB")  # [H,W] uint8 -> L


def check_prompt_text(prompt: str, what: str = "prompt") -> None:
    """`InputError` for a prompt holding lone surrogates: bytes that were not UTF-8 (Python decodes such a
    command-line argument with surrogate escapes), which the tokenizer cannot take."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        c = ord(prompt[err.start])
        found = f"the byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"the lone surrogate U+{c:04X}"
        raise InputError(f"{what}: not valid UTF-8 text: expected UTF-8, found {found} at character "
                         f"{err.start}") from err


def open_image(path: str):
    """The image file at `path` as RGB (high-bit-depth scaled by `to_rgb`), its size checked before decoding;
    `InputError` for a missing, unreadable or oversized file."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check_image_size(im.size, path)  # before decoding: a few hundred bytes can declare gigapixels
                return to_rgb(im)
    except FileNotFoundError as err:
        raise InputError(f"{path}: no such image file") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InputError(f"{path}: refused as a decompression bomb ({str(err).splitlines()[0][:120]})") from err
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"{path}: not a readable image ({type(err).__name__})") from err
