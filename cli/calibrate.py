"""`btp-calibrate MODEL --data builtin|DIR -o plan.json`: a BTP plan from a calibration set.

The paper's rule places the boundaries from the per-layer drift profile; `--method search` then searches
boundaries, per-stage keeps, attention shares and diversity stages for the least output distortion under the
same target, from the rule's plan and every preset scaled to it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from btp.cli.common import add_alias, add_common, check_writable, print_json, run_main, save_figure
from btp.compiler.calibrate import Profile, Target, calibrate
from btp.compiler.calibration_data import load_samples
from btp.compiler.models import load_model
from btp.compiler.plan import FORMAT, Plan
from btp.compiler.presets import model_info


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="btp-calibrate", description=__doc__)
    p.add_argument("model", help="Hugging Face checkpoint directory, hub id, or builtin:NAME")
    p.add_argument("--data", required=True, help="'builtin' or a directory with images and prompts.jsonl")
    p.add_argument("--samples", type=int, default=64, help="calibration samples, held-out share included (64)")
    p.add_argument("--heldout", type=float, default=0.25, help="share of the samples held out for reporting")
    p.add_argument("--seed", type=int, default=0, help="seed of the builtin data")
    p.add_argument("--tau", type=float, default=0.93, help="cosine below which a token counts as drifting")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--tokens", type=float, help="target layer-averaged image tokens")
    goal.add_argument("--retention", type=float, help="target layer-averaged share of image tokens, e.g. 0.22")
    goal.add_argument("--flops", type=float, help="target share of the unpruned decoder FLOPs, e.g. 0.25")
    p.add_argument("--stages", type=int, default=4, help="pruning stages (4, as in the paper)")
    p.add_argument("--lambda-start", type=float, default=0.6, help="attention share of the first stage")
    p.add_argument("--keep-last", type=int, nargs="?", const=-1, default=-1, metavar="N",
                   help="image tokens kept to the end (default N0/16; 0 lets the last stage drop them all)")
    p.add_argument("--method", choices=("drift", "search"), default="drift")
    p.add_argument("--budget-evals", type=int, default=40, help="plans the search may evaluate (40)")
    p.add_argument("--batch", type=int, default=8, help="samples per forward pass (8)")
    add_alias(p, "--batch-size", "batch", type=int)
    p.add_argument("-o", "--out", required=True, help="plan file to write")
    p.add_argument("--plot", help="PNG of the drift/attention profile with the chosen schedule")
    add_common(p, "print the plan, with its statistics, as one JSON object on stdout")
    return p


def _progress(bar: Progress):
    """`calibrate`'s progress callback: one bar per phase."""
    tasks: dict[str, int] = {}

    def update(phase: str, done: int, total: int, best: float | None = None) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total)
        label = phase if best is None else f"{phase} (best distortion {best:.4f})"
        bar.update(tasks[phase], completed=done, total=total, description=label)

    return update


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console(stderr=args.json, highlight=False)  # with --json, stdout is the result alone

    def body() -> int:
        check_writable(args.out, "-o")
        if args.plot:
            check_writable(args.plot, "--plot")
        target = Target(tokens=args.tokens, retention=args.retention, flops=args.flops)
        with console.status(f"loading {args.model}"):
            model = load_model(args.model)
            samples = load_samples(args.data, args.samples, args.seed)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            result = calibrate(model, samples, target, args.method, args.heldout, args.tau, args.stages,
                               args.lambda_start, None if args.keep_last == -1 else args.keep_last,
                               args.budget_evals, args.batch, source={"data": args.data, "seed": args.seed},
                               progress=_progress(bar))
        plan = result.plan
        plan.save(args.out)
        for note in result.notes:
            console.print(note)
        summary = _summary(model, plan)
        _print(console, model, plan, result.report, summary, target)
        if args.plot:
            baseline = "rule's plan" if result.origin == "rule" else "search start"
            plot_profile(result.profile, plan, result.baseline, args.plot, baseline)
            console.print(f"wrote {args.plot}")
        console.print(f"wrote {args.out}")
        if args.json:
            print_json({"out": str(args.out), "plot": args.plot, **summary, "notes": result.notes,
                        "plan": json.loads(plan.to_json())})
        return 0

    return run_main(body, args.debug, "btp-calibrate", options=vars(args))


def _summary(model, plan: Plan) -> dict:
    """The plan's layer-averaged image tokens and decoder FLOPs against the unpruned model's, with the calibration
    set's mean text tokens."""
    text = round(plan.calibration["text_tokens"])
    d, m = model.hidden_size, model.intermediate_size
    full = Plan(format=FORMAT, model=model_info(model)).flops(d, m, text)
    return {"image_tokens": model.image_tokens, "layer_averaged_image_tokens": plan.average_image_tokens(),
            "text_tokens": text, "flops_ratio": plan.flops(d, m, text) / full}


def _print(console, model, plan: Plan, report: dict, summary: dict, target: Target) -> None:
    table = Table("stage", "first layer", "keep", "spatial", "attention", "diversity", "rho", "lambda",
                  title="schedule")
    for i, s in enumerate(plan.stages):
        lam = "-" if s.lambda_ is None else f"{s.lambda_:.2f}"
        table.add_row(str(i + 1), str(s.layer), str(s.keep), str(s.spatial), str(s.attention), str(s.diversity),
                      f"{s.rho:.2f}", lam)
    console.print(table)
    n0, avg = model.image_tokens, summary["layer_averaged_image_tokens"]
    console.print(f"layer-averaged image tokens {avg:.2f} of {n0} ({100 * avg / n0:.1f}%), decoder FLOPs "
                  f"{100 * summary['flops_ratio']:.1f}% of unpruned (with {summary['text_tokens']} text tokens)"
                  + (f"; target {target.describe()}" if target.describe() else ""))
    dist = Table("plan", "calibration KL", "calibration cosine", "held-out KL", "held-out cosine",
                 title="distortion vs the unpruned model")
    for name, r in report.items():
        h = r.get("heldout", {})
        if name == "search":
            name = f"search (from {r['origin']}, {r['evaluations']} plans)"
        dist.add_row(name, f"{r['calibration']['kl']:.5f}", f"{r['calibration']['cosine']:.5f}",
                     f"{h.get('kl', float('nan')):.5f}", f"{h.get('cosine', float('nan')):.5f}")
    console.print(dist)


def plot_profile(profile: Profile, plan: Plan, rule: Plan, path: str | Path, baseline: str = "rule's plan") -> Path:
    """Drift and attention per layer with the boundaries and the token schedule drawn over them; `rule` (named
    `baseline` in the legend) drawn too where it differs from `plan`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(len(profile.drift)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[3, 2])
    top.bar(layers, profile.drift, color="#7aa6d8", label=f"drifting image tokens (cos < {profile.tau})")
    top.set_ylabel("image tokens drifting")
    twin = top.twinx()
    twin.plot(layers, profile.attention, color="#d9534f", marker="o", ms=3, label="last-token attention on image")
    twin.set_ylabel("attention mass on image")
    for s in plan.stages:
        top.axvline(s.layer - 0.5, color="black", ls="--", lw=1)
    top.set_title(f"calibration profile ({profile.samples} samples)")
    handles = top.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    top.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=8)
    bottom.step(layers, plan.layer_tokens(), where="mid", color="black", label="chosen plan")
    if rule.stages != plan.stages:
        bottom.step(layers, rule.layer_tokens(), where="mid", color="gray", ls=":", label=baseline)
    bottom.set_ylabel("image tokens alive")
    bottom.set_xlabel("decoder layer (0-based)")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
