"""`btp-calibrate MODEL --data builtin|DIR -o plan.json`: a BTP plan from a calibration set.

The paper's rule places the boundaries from the per-layer drift profile; `--method search` then searches
boundaries, budgets and attention shares that minimise the output distortion under the same target.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from btp.runtime.cli import check_writable, run_main

from .calibrate import (
    Profile,
    Target,
    collect_profile,
    distortion,
    plan_from,
    reachable_start,
    reference_outputs,
    rule_genome,
    search,
)
from .calibration_data import load_samples, split
from .models import load_model
from .plan import FORMAT, Plan
from .presets import model_info


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
    p.add_argument("--keep-last", type=int, nargs="?", const=-1, default=0, metavar="N",
                   help="keep N image tokens to the end instead of dropping them all (default N0/16)")
    p.add_argument("--method", choices=("drift", "search"), default="drift")
    p.add_argument("--budget-evals", type=int, default=24, help="plans the search may evaluate (24)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("-o", "--out", required=True, help="plan file to write")
    p.add_argument("--plot", help="PNG of the drift/attention profile with the chosen schedule")
    p.add_argument("--debug", action="store_true")
    return p


def _bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console(highlight=False)

    def body() -> int:
        check_writable(args.out, "-o")
        if args.plot:
            check_writable(args.plot, "--plot")
        target = Target(tokens=args.tokens, retention=args.retention, flops=args.flops)
        with console.status(f"loading {args.model}"):
            model = load_model(args.model)
            samples = load_samples(args.data, args.samples, args.seed)
        cal, held = split(samples, args.heldout)
        n0 = model.image_tokens
        floor = max(1, n0 // 16) if args.keep_last == -1 else args.keep_last
        with _bar(console) as bar:
            task = bar.add_task("statistics", total=len(cal))
            profile = collect_profile(model, cal, args.tau, args.batch_size,
                                      lambda d, t: bar.update(task, completed=d))
        text = round(profile.text_tokens)
        start = rule_genome(profile, args.stages, args.lambda_start)
        origin = "rule"
        if args.method == "search":
            # The search may move the boundaries; when the rule's are too late for the target, it starts from
            # the nearest earlier ones that reach it (the rule's plan is then not made).
            moved = reachable_start(model, start, target, text, floor)
            if moved != start:
                console.print(f"the rule's boundaries {list(start.layers)} cannot reach {target.describe()}; "
                              f"the search starts from {list(moved.layers)}")
                origin, start = "start", moved
        rule = plan_from(model, start, target, text, floor)
        with _bar(console) as bar:
            task = bar.add_task("reference outputs", total=2)
            ref_cal = reference_outputs(model, cal, args.batch_size)
            bar.update(task, advance=1)
            ref_held = reference_outputs(model, held, args.batch_size) if held else None
            bar.update(task, advance=1)
        report = {origin: _report(model, rule, cal, held, ref_cal, ref_held, args.batch_size)}
        chosen = rule
        if args.method == "search":
            # Without an explicit target the search keeps the rule's layer-averaged tokens: fewer distortion
            # must not come from simply keeping more tokens.
            goal = target if target.describe() else Target(tokens=rule.average_image_tokens())
            with _bar(console) as bar:
                task = bar.add_task("search", total=args.budget_evals)
                result = search(model, start, goal, text, cal, ref_cal, args.budget_evals, floor, args.batch_size,
                                lambda d, t: bar.update(task, completed=d))
            chosen = result.plan
            report["search"] = _report(model, chosen, cal, held, ref_cal, ref_held, args.batch_size)
            report["search"]["evaluations"] = result.evaluations
            report["search"]["genome"] = {"ratio": result.best.ratio, "lambda_start": result.best.lambda_start}
        calibration = {
            "method": args.method, "samples": len(cal), "heldout": len(held), "tau": args.tau,
            "data": args.data, "seed": args.seed, "target": target.describe(), "text_tokens": profile.text_tokens,
            "drift": [round(x, 3) for x in profile.drift], "attention": [round(x, 5) for x in profile.attention],
            "distortion": report,
        }
        plan = chosen.model_copy(update={"calibration": calibration})
        plan = Plan.parse(plan.model_dump(mode="json", by_alias=True, exclude_none=True))  # re-validated
        plan.save(args.out)
        _print(console, model, plan, rule, report, text, target)
        if args.plot:
            plot_profile(profile, plan, rule, args.plot, "rule's plan" if origin == "rule" else "search start")
            console.print(f"wrote {args.plot}")
        console.print(f"wrote {args.out}")
        return 0

    return run_main(body, args.debug, "btp-calibrate")


def _report(model, plan, cal, held, ref_cal, ref_held, batch) -> dict:
    out = {"layers": [s.layer for s in plan.stages], "keeps": [s.keep for s in plan.stages],
           "average_tokens": plan.average_image_tokens(), "calibration": distortion(model, plan, cal, ref_cal, batch)}
    if held:
        out["heldout"] = distortion(model, plan, held, ref_held, batch)
    return out


def _print(console, model, plan: Plan, rule: Plan, report: dict, text: int, target: Target) -> None:
    table = Table("stage", "first layer", "keep", "spatial", "attention", "diversity", "rho", "lambda",
                  title="schedule")
    for i, s in enumerate(plan.stages):
        lam = "-" if s.lambda_ is None else f"{s.lambda_:.2f}"
        table.add_row(str(i + 1), str(s.layer), str(s.keep), str(s.spatial), str(s.attention), str(s.diversity),
                      f"{s.rho:.2f}", lam)
    console.print(table)
    d, m, n0 = model.hidden_size, model.intermediate_size, model.image_tokens
    full = Plan(format=FORMAT, model=model_info(model)).flops(d, m, text)
    avg = plan.average_image_tokens()
    console.print(f"layer-averaged image tokens {avg:.2f} of {n0} ({100 * avg / n0:.1f}%), decoder FLOPs "
                  f"{100 * plan.flops(d, m, text) / full:.1f}% of unpruned (with {text} text tokens)"
                  + (f"; target {target.describe()}" if target.describe() else ""))
    dist = Table("plan", "calibration KL", "calibration cosine", "held-out KL", "held-out cosine",
                 title="distortion vs the unpruned model")
    for name, r in report.items():
        h = r.get("heldout", {})
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
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    sys.exit(main())
