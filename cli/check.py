"""`btp-check OUT`: prove an artifact against the PyTorch reference with Polygraphy (`btp.tools.check`), one
table or `--json`; exit 1 when a graph or the tokens disagree."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from btp.cli.common import FAILED, OK, add_alias, add_common, check_writable, print_json, run_main
from btp.runtime.errors import InputError
from btp.tools.check import FP32_TOL, default_samples, run_check


def _samples(args):
    from btp.runtime.inputs import open_image
    from btp.tools.samples import SAMPLE_QUESTION

    if args.image:
        prompts = args.prompt or [SAMPLE_QUESTION] * len(args.image)
        if len(prompts) != len(args.image):
            raise InputError(f"expected one --prompt per --image, got {len(prompts)} and {len(args.image)}")
        return [open_image(path) for path in args.image], prompts
    if args.samples < 1:
        raise InputError(f"--samples must be >= 1, got {args.samples}")
    return default_samples(args.samples)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="btp-check", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--image", action="append", help="sample image (repeatable); default: bundled samples")
    p.add_argument("--prompt", action="append", help="question per --image")
    p.add_argument("--samples", type=int, default=3, help="bundled samples when no --image (3)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="new tokens per sample (8)")
    add_alias(p, "--steps", "max_new_tokens", type=int)
    p.add_argument("--save", type=Path, help="write Polygraphy inputs/outputs per graph to this directory")
    add_common(p, "print the report as JSON")
    args = p.parse_args(argv)

    def body() -> int:
        if args.save:
            check_writable(args.save, "--save", directory=True, parents=True)
        if args.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        images, prompts = _samples(args)
        report = run_check(args.artifact, images, prompts, args.max_new_tokens, args.save)
        if args.json:
            print_json(report)
        else:
            print_report(report, args.save)
        return OK if report["passed"] else FAILED

    return run_main(body, args.debug, "btp-check", options=vars(args))


def print_report(report: dict, save: Path | None = None, console=None) -> None:
    """The report of `check_artifact` as a table (on stdout, or `console`); with `save`, the Polygraphy command
    that replays each graph's comparison from the saved data."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    short = {"onnxruntime": "ort", "tensorrt": "trt"}
    table = Table("graph", "feeds", "max abs error", "ties", "result", title=f"btp-check {report['artifact']}")
    for g in report["graphs"]:
        errors = [(r, max(g["errors"].get(r, {}).values(), default=0.0)) for r in g["runners"]]
        worst = " / ".join(f"{short.get(r, r)} {e:.2e}" for r, e in errors) if len(errors) > 1 else \
            f"{max(g['worst'].values(), default=0.0):.2e}"
        feeds = str(g["feeds"]) + (f" (trt {'+'.join(map(str, g['profile_feeds']))})" if g["profile_feeds"] else "")
        result = "[green]pass[/green]" if g["passed"] else f"[red]FAIL[/red] {g['failures'][0]}"
        table.add_row(g["graph"], feeds, worst, str(g["ties"]), result)
    console.print(table)
    skipped = f"; tensorrt skipped: {report['tensorrt_skipped']}" if report["tensorrt_skipped"] else ""
    console.print(f"runners: {', '.join(report['runners'])}{skipped}")
    t = report["tokens"]
    console.print(f"greedy tokens vs reference: {100 * t['mean']:.1f}% agreement over {report['samples']} samples "
                  f"({report['pipeline_backend']} pipeline)")
    if save:
        for g in report["graphs"]:
            console.print(f"polygraphy run {report['artifact']}/onnx/{g['graph']}.onnx --onnxrt "
                          f"--load-inputs {save}/{g['graph']}.inputs.json "
                          f"--load-outputs {save}/{g['graph']}.outputs.json --atol {FP32_TOL} --rtol {FP32_TOL}")
    console.print("[green]PASS[/green]" if report["passed"] else "[red]FAIL[/red]")


if __name__ == "__main__":
    sys.exit(main())
