"""`btp-bench OUT`: speed of a pruned artifact against its unpruned twin, Hugging Face and the FLOPs ideal
(`btp.tools.bench`), or `--sweep` over plans; a table, a plot or `--json`."""

from __future__ import annotations

import argparse
import sys

from btp.cli.common import add_alias, add_common, check_writable, emit, print_json, run_main
from btp.runtime.dependencies import require
from btp.runtime.errors import InputError
from btp.tools.bench import bench, plot, plot_sweep, sweep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="btp-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--baseline", default="unpruned,hf", help="comma list of unpruned, hf (default: both)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="text tokens beside the image (64)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="answer length: every run decodes exactly this many tokens (32)")
    add_alias(p, "--new-tokens", "max_new_tokens", type=int)
    p.add_argument("--batch", type=int, default=1, help="batch size of the runs, at most the artifact's max batch (1)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--plot", help="PNG of the breakdown and the ratios (with --sweep: TTFT against tokens)")
    p.add_argument("--sweep", choices=["presets", "budgets"],
                   help="compile several plans for OUT's model (cached) and measure TTFT against tokens")
    p.add_argument("--plans", help="with --sweep: comma list of presets, or of layer-averaged shares for budgets")
    p.add_argument("--rebuild", action="store_true", help="recompile the cached unpruned twin")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                   help="engines to time (default: onnxruntime; tensorrt needs an artifact built with engines)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N], for the engines and Hugging Face (default: cpu)")
    add_common(p, "print the report as one JSON object on stdout")
    args = p.parse_args(argv)

    def body() -> int:
        if args.plot:
            check_writable(args.plot, "--plot")
        require("onnxruntime")
        if min(args.repeat, args.max_new_tokens, args.batch, args.prompt_tokens) < 1:
            raise InputError("--repeat, --max-new-tokens, --batch and --prompt-tokens must be >= 1")
        log = lambda m: print(m, file=sys.stderr)  # noqa: E731
        if args.sweep and (args.backend, args.device) != ("onnxruntime", "cpu"):
            raise InputError("--sweep measures ONNX Runtime on the CPU only; drop --backend/--device")
        if args.sweep:
            names = [x.strip() for x in args.plans.split(",") if x.strip()] if args.plans else None
            if args.sweep == "budgets" and names:
                try:
                    [float(x) for x in names]
                except ValueError as err:
                    raise InputError(f"--plans with --sweep budgets takes shares such as 0.22,0.11: {err}") from None
            report = sweep(args.artifact, args.sweep, args.prompt_tokens, args.batch, args.repeat, names, log)
            if args.plot:
                plot_sweep(report, args.plot)
            print_json(report) if args.json else _print_sweep(report)
            return 0
        if args.plans:
            raise InputError("--plans goes with --sweep")
        if args.backend == "tensorrt":
            require("tensorrt")
        baselines = {b.strip() for b in args.baseline.split(",") if b.strip()}
        unknown = baselines - {"unpruned", "hf"}
        if unknown:
            raise InputError(f"--baseline takes unpruned and/or hf, got {sorted(unknown)}")
        report = bench(args.artifact, baselines, args.prompt_tokens, args.max_new_tokens, args.batch, args.repeat,
                       log=log, rebuild=args.rebuild, backend=args.backend, device=args.device)
        return emit(report, args.json, _print, args.plot, plot)

    return run_main(body, args.debug, "btp-bench", options=vars(args))


def _print(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    table = Table("run", "TTFT median ms", "TTFT min ms", "decode tok/s", "KV cache MB",
                  title=f"btp-bench {report['artifact']} ({report['prompt_tokens']} prompt tokens, "
                        f"{report['new_tokens']} new, batch {report['batch']})")
    for name in ("pruned", "unpruned", "hf"):
        if name in report:
            r = report[name]
            kv = f"{r['kv_cache_bytes'] / 2**20:.1f}" if "kv_cache_bytes" in r else "-"
            table.add_row(name, f"{r['ttft_ms']:.1f}", f"{r['ttft_min_ms']:.1f}", f"{r['decode_tokens_per_s']:.1f}", kv)
    console.print(table)
    f = report["flops"]
    console.print(f"FLOPs ideal prefill speedup {f['ideal_speedup']:.2f} decoder only, "
                  f"{f['ideal_ttft_speedup']:.2f} with the vision tower "
                  f"({f['layer_averaged_image_tokens']:.1f} layer-averaged image tokens)")
    console.print("  ".join(f"{k} {v:.3f}" for k, v in report["ratios"].items()))


def _print_sweep(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("plan", "layer-averaged image tokens", "GFLOPs (MAC)", "TTFT median ms", "TTFT min ms",
                  title=f"btp-bench --sweep {report['sweep']} {report['artifact']}")
    for q in sorted(report["points"], key=lambda q: -q["layer_averaged_image_tokens"]):
        table.add_row(q["plan"], f"{q['layer_averaged_image_tokens']:.1f}", f"{q['flops'] / 1e9:.1f}",
                      f"{q['ttft_ms']:.1f}", f"{q['ttft_min_ms']:.1f}")
    Console(highlight=False).print(table)


if __name__ == "__main__":
    sys.exit(main())
