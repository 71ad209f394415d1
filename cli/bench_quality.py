"""`btp-bench-quality MODEL`: accuracy each plan keeps on the toy task's test split (`btp.tools.bench_quality`);
a table, a plot or `--json`."""

from __future__ import annotations

import argparse
import sys

from btp.cli.common import add_common, check_writable, emit, run_main, stdout_to_stderr
from btp.runtime.dependencies import require
from btp.runtime.errors import InputError
from btp.tools.bench_quality import BASELINES, plot, quality
from btp.toy import task as toy_task


def _floats(text: str, option: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{option} takes comma-separated shares such as 0.22,0.11, got {text!r}") from None
    if not values or not all(0 < v < 1 for v in values):
        raise InputError(f"{option}: every share must lie strictly between 0 and 1, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="btp-bench-quality", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="builtin:toy-vlm", help="a model trained on the toy task")
    p.add_argument("--plans", default="none,btp,fastv,pdrop,divprune",
                   help="comma list of presets and plan files (default: every preset)")
    p.add_argument("--budgets", help="layer-averaged image-token shares the presets are scaled to, e.g. 0.22,0.11")
    p.add_argument("--calibrate", default="", help="comma list of btp-calibrate methods (drift, search) to add "
                                                   "at each budget, calibrated on the task's train split")
    p.add_argument("--calibration-samples", type=int, default=64)
    p.add_argument("--baselines", default="", help="comma list of random, grid: layer-0 selections of each budget's "
                                                   "tokens, at random per question or on a fixed grid")
    p.add_argument("--samples", type=int, help=f"test questions (default: the whole split, {toy_task.TEST_SIZE})")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cache", default="build/quality", help="where compiled plans are kept")
    p.add_argument("--plot", help="PNG of retained accuracy against layer-averaged image tokens")
    add_common(p, "print the report as one JSON object on stdout")
    args = p.parse_args(argv)

    def body() -> int:
        require("onnxruntime")  # the engines every plan answers with; then the output, then the work
        if args.plot:
            check_writable(args.plot, "--plot")
        plans = [x.strip() for x in args.plans.split(",") if x.strip()]
        if not plans:
            raise InputError("--plans is empty")
        budgets = _floats(args.budgets, "--budgets") if args.budgets else None
        calibrate = [x.strip() for x in args.calibrate.split(",") if x.strip()]
        bad = [c for c in calibrate if c not in ("drift", "search")]
        if bad:
            raise InputError(f"--calibrate takes drift and/or search, got {bad}")
        if calibrate and not budgets:
            raise InputError("--calibrate needs --budgets (the shares the plans are calibrated for)")
        baselines = [x.strip() for x in args.baselines.split(",") if x.strip()]
        if [b for b in baselines if b not in BASELINES] or (baselines and not budgets):
            raise InputError(f"--baselines takes random and/or grid, with --budgets; got {args.baselines!r}")
        if args.batch < 1 or (args.samples is not None and args.samples < 1) or args.calibration_samples < 2:
            raise InputError("--batch and --samples must be >= 1, --calibration-samples >= 2")
        with stdout_to_stderr():  # whatever the compiler prints; stdout is the report
            report = quality(args.model, plans, budgets, calibrate, args.samples, args.batch, args.cache,
                             args.calibration_samples, log=lambda m: print(m, file=sys.stderr),
                             baselines=baselines)
        return emit(report, args.json, _print, args.plot, plot)

    return run_main(body, args.debug, "btp-bench-quality", options=vars(args))


def _print(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("plan", "layer-averaged image tokens", "share", "decoder FLOPs", "accuracy", "retained",
                  "agreement", title=f"btp-bench-quality {report['model']} ({report['samples']} test questions)")
    for r in report["rows"]:
        if "skipped" in r:
            table.add_row(r["plan"], "-", "-", "-", "-", "skipped: out of reach" if "reach" in r["skipped"]
                          else "skipped", "-")
            continue
        retained = f"{100 * r['retained']:.1f}%" if "retained" in r else "-"
        agree = f"{100 * r['agreement']:.1f}%" if "agreement" in r else "-"
        table.add_row(r["plan"], f"{r['layer_averaged_image_tokens']:.1f}", f"{100 * r['image_token_share']:.1f}%",
                      f"{100 * r['flops_ratio']:.1f}%", f"{100 * r['accuracy']:.1f}%", retained, agree)
    console = Console(highlight=False)
    console.print(table)
    for c in report.get("comparisons", []):
        verdict = "significant" if c["significant"] else "not significant"
        console.print(f"{c['plan']} vs {c['against']}: {100 * c['accuracy_difference']:+.1f} points, right only "
                      f"with it {c['only_plan']}, only with {c['against']} {c['only_against']}; McNemar exact "
                      f"p = {c['p_value']:.3g} ({verdict} at {report['significance']})")


if __name__ == "__main__":
    sys.exit(main())
