"""The toy model's trainer (what `btp-train-toy` runs): seeded and deterministic for a given thread count.

Two phases:

1. Vision warm-up (`--vision-steps`): the vision tower and projector alone, with a probe on the projected
   image tokens that reads each patch's colour, shape and size (0 for background) through the text model's
   embeddings of those words, and its grid cell. A few hundred cheap steps make every image token say
   plainly what and where it shows, in the words a question uses. One query head per KV group of every text
   layer starts with its key projection equal to its query projection (`matching_heads`), so that words
   find the image tokens that look like them.
2. Everything: next-token loss on the answers only (prompt: the LLaVA-1.5 chat template around the
   question; target: the answer and `</s>`), several chat turns about each image with the question kinds
   balanced, plus `--aux` times the probe's loss, plus read-outs of the text model's hidden states at the
   words a question is about (`QuestionReadout`): after layer 1, at the shape word of each object named by
   colour and shape, the colour word before it (`--colour-aux`); after `--object-layer`, the object's grid cell
   (`--object-aux`) and, at the counted word of a count question, the count (`--count-aux`). AdamW with a
   linear warm-up and a cosine decay.

At the end: exact-match accuracy of greedy `generate` on the fixed test split, per question kind, then
model and processor saved (safetensors) with a `training.json` of the run. The probe and the read-outs do
not ship.
"""

from __future__ import annotations

import json
import platform
import random
import sys
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import task as toy_task
from .training import (
    PatchProbe,
    QuestionReadout,
    _Projected,
    accuracy,
    build,
    curriculum_objects,
    encode_batch,
    extra_turns,
    lr_at,
    patch_cells,
    patch_labels,
    thin,
    turn_loss,
)


def _progress(console: Console, quiet: bool) -> Progress:
    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f}  lr {task.fields[lr]:.2e}"), TimeElapsedColumn(),
               TimeRemainingColumn()]
    return Progress(*columns, console=console, disable=quiet)


def warm_up_vision(model, processor, probe: PatchProbe, projected: _Projected, side: int, stream, args,
                   console: Console):
    """Phase 1: the vision tower and projector alone learn, through `probe`, to say what each patch shows
    (`patch_labels` of a `side` x `side` grid) and where it lies: cheap (no text model), and it removes the
    long plateau during which the text model would otherwise shape the image features through its attention."""
    cells = patch_cells(side, model.config.vision_config.image_size)
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
              *probe.parameters()]
    opt = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=0.01)
    ema = None
    words = model.get_input_embeddings().weight
    words.requires_grad_(False)  # the tied probe reads the word embeddings; only phase 2 trains them
    with _progress(console, args.quiet) as progress:
        task = progress.add_task("vision", total=args.vision_steps, loss=float("nan"), lr=0.0)
        for step in range(args.vision_steps):
            samples = [next(stream) for _ in range(args.vision_batch)]
            labels = torch.stack([patch_labels(s, side) for s in samples])
            pixels = processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
            lr = lr_at(step, args.vision_steps, max(1, args.vision_steps // 15), args.vision_lr, 0.1)
            for group in opt.param_groups:
                group["lr"] = lr
            model.model.get_image_features(pixel_values=pixels,
                                           vision_feature_layer=model.config.vision_feature_layer,
                                           vision_feature_select_strategy=model.config.vision_feature_select_strategy)
            loss = probe(projected.tokens, labels, cells)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
            progress.update(task, advance=1, loss=ema, lr=lr)
    words.requires_grad_(True)
    return ema


def train(args, console: Console):
    """Both phases: `warm_up_vision`, then everything on the answers' loss plus `args.aux` times the probe's and
    the `QuestionReadout` losses times their weights."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    spec, model, processor = build(args.seed)
    params = sum(p.numel() for p in model.parameters())
    side = spec.image_size // spec.patch_size
    console.print(f"toy-vlm: {params / 1e6:.2f} M parameters, {spec.image_size} px, "
                  f"{side * side} image tokens, {spec.layers} text layers")
    model.train()
    probe = PatchProbe(model.get_input_embeddings(), processor.tokenizer)
    projected = _Projected(model)
    readout = (QuestionReadout(model, processor.tokenizer, args.object_layer, args.colour_layer)
               if args.object_aux or args.count_aux or args.colour_aux else None)
    cells = patch_cells(side, spec.image_size)
    stream = toy_task.iter_split("train")
    rng = random.Random(f"btp-train-toy:{args.seed}")
    start = time.perf_counter()
    if args.vision_steps:
        warm_up_vision(model, processor, probe, projected, side, stream, args, console)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": rest + list(probe.parameters())
                              + (list(readout.parameters()) if readout else []), "weight_decay": 0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    warmup = max(1, int(args.warmup * args.steps))
    ema, eval_s, kind_loss = None, 0.0, {}
    with _progress(console, args.quiet) as progress:
        task = progress.add_task("train", total=args.steps, loss=float("nan"), lr=0.0)
        for step in range(args.steps):
            keep = curriculum_objects(step, args.steps, args.curriculum)
            samples = [thin(next(stream), keep, rng) for _ in range(args.batch)]
            turns = [extra_turns(s, args.turns - 1, rng, not args.no_describe) for s in samples]
            batch = encode_batch(processor, samples, turns)
            lr = lr_at(step, args.steps, warmup, args.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            seen: dict[str, float] | None = {} if args.eval_every else None  # only the progress reports read it
            loss = total = turn_loss(model, batch, seen)
            if args.aux:
                labels = torch.stack([patch_labels(s, side) for s in samples])
                total = total + args.aux * probe(projected.tokens, labels, cells)
            if readout is not None:
                read = readout(batch)
                total = total + args.object_aux * read["cell"] + args.count_aux * read["count"] \
                    + args.colour_aux * read["colour"]
                if seen is not None:
                    seen.update({f"{name} read-out": value.item() for name, value in read.items()})
            for kind, value in (seen or {}).items():  # running means for the progress reports
                kind_loss[kind] = value if kind not in kind_loss else 0.95 * kind_loss[kind] + 0.05 * value
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            progress.update(task, advance=1, loss=ema, lr=lr)
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                tick = time.perf_counter()
                acc, kinds = accuracy(model, processor, toy_task.make_split("test", args.eval_samples))
                progress.console.print(f"step {step + 1} ({tick - start - eval_s:.0f} s): loss {ema:.3f}, "
                                       f"test accuracy ({args.eval_samples}) {acc:.1%}  "
                                       + "  ".join(f"{k} {v:.0%}" for k, v in kinds.items())
                                       + "; training loss per answer (all turns, </s> included) "
                                       + "  ".join(f"{k} {v:.2f}" for k, v in kind_loss.items()))
                eval_s += time.perf_counter() - tick
    train_s = time.perf_counter() - start - eval_s  # the optional progress evaluations do not count
    return spec, model.eval(), processor, params, train_s, ema


def train_and_save(args, argv, console: Console) -> dict:
    """Train, report the test accuracy and save the model, the processor and `training.json` (returned) to
    `args.out`."""
    spec, model, processor, params, train_s, loss = train(args, console)
    start = time.perf_counter()
    test = toy_task.make_split("test", args.test_samples)
    acc, kinds = accuracy(model, processor, test)
    eval_s = time.perf_counter() - start
    table = Table(title=f"test split: {len(test)} samples, exact match")
    table.add_column("kind")
    table.add_column("accuracy", justify="right")
    for k, v in kinds.items():
        table.add_row(k, f"{v:.1%}")
    table.add_row("all", f"{acc:.1%}", style="bold")
    console.print(table)
    console.print(f"training {train_s:.0f} s ({args.steps} steps x {args.batch}), test {eval_s:.0f} s, "
                  f"{args.threads} threads")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    record = {
        "command": "btp-train-toy " + " ".join(sys.argv[1:] if argv is None else argv),
        "steps": args.steps, "batch": args.batch, "turns": args.turns, "curriculum": args.curriculum,
        "describe": not args.no_describe, "vision_steps": args.vision_steps, "vision_batch": args.vision_batch,
        "vision_lr": args.vision_lr, "aux": args.aux,
        "object_aux": args.object_aux, "count_aux": args.count_aux, "colour_aux": args.colour_aux,
        "object_layer": args.object_layer, "colour_layer": args.colour_layer,
        "lr": args.lr, "warmup": args.warmup,
        "weight_decay": args.weight_decay, "seed": args.seed, "threads": args.threads,
        "parameters": params, "image_tokens": (spec.image_size // spec.patch_size) ** 2,
        "final_loss": round(loss, 4), "train_seconds": round(train_s, 1), "test_seconds": round(eval_s, 1),
        "test_samples": len(test), "test_accuracy": round(acc, 4),
        "test_accuracy_by_kind": {k: round(v, 4) for k, v in kinds.items()},
        "torch": torch.__version__, "machine": platform.machine(),
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    console.print(f"saved to {args.out}")
    return record
