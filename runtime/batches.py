"""The sub-batches of one `generate` call: rows whose images give one image-token count run together (families
whose count follows the image's size), in chunks of at most the artifact's `max_batch`; results merge back in
input order."""

from __future__ import annotations

import dataclasses

import torch

from .errors import InputError


def listed(images, prompts) -> tuple[list, list]:
    """One image per prompt as two lists (a lone image or prompt string is a batch of one); `InputError` else."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if len(images) != len(prompts) or not prompts:
        raise InputError(f"expected one image per prompt, got {len(images)} images and {len(prompts)} prompts")
    return images, prompts


def sub_batches(sizes: list, max_batch: int | None) -> list[list[int]]:
    """Row indices of each sub-batch, groups in order of their first row: rows of one image size `sizes [B]` (any
    hashable key) together, cut into chunks of `max_batch` (None: no bound)."""
    groups: dict = {}
    for row, size in enumerate(sizes):
        groups.setdefault(size, []).append(row)
    size = max_batch or len(sizes)
    return [rows[i : i + size] for rows in groups.values() for i in range(0, len(rows), size)]


def merge(outs: list, parts: list[list[int]]):
    """One `GenerateOutput` of the sub-batches' `outs` (rows `parts`), rows in input order. `logits[s]` is `[B,V]`
    fp32 over all rows, NaN for rows whose sub-batch had ended before step s; `timings` add up over the sub-batches,
    which run one after another, except `decode_tokens_per_s`: all decoded tokens over all decode time."""
    back = torch.tensor([row for rows in parts for row in rows]).argsort().tolist()  # input row -> its place in outs
    joined = {k: [r for o in outs for r in getattr(o, k)] for k in ("texts", "token_ids", "prompt_ids", "kept_indices")}
    times = {key: sum(o.timings.get(key, 0.0) for o in outs) for out in outs for key in out.timings}
    decoded = [(max(map(len, o.token_ids)) - 1) * len(p) for o, p in zip(outs, parts)]  # decode steps x rows
    seconds = sum(d / o.timings["decode_tokens_per_s"] for d, o in zip(decoded, outs) if d)
    times["decode_tokens_per_s"] = sum(decoded) / seconds if seconds else 0.0
    logits, steps = [], max(len(o.logits) for o in outs)
    if steps:  # [S_i,B_i,V] per sub-batch, NaN-padded to [S,B_i,V], rows put back in input order
        padded = [torch.nn.functional.pad(torch.stack(o.logits).float(), (0, 0, 0, 0, 0, steps - len(o.logits)),
                                          value=torch.nan) for o in outs]
        logits = list(torch.cat(padded, 1)[:, back].unbind(0))
    fields = {key: [rows[i] for i in back] for key, rows in joined.items()}
    return dataclasses.replace(outs[0], **fields, timings=times, logits=logits)
