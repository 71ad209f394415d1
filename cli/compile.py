"""`btp-compile MODEL --plan PLAN -o OUT`: export every graph of a BTP-pruned model into an artifact."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from btp.cli.common import FAILED, OK, add_common, print_json, run_main, stdout_to_stderr
from btp.compiler.build import BACKENDS, BuildConfig, compile_artifact
from btp.compiler.export import Limits
from btp.compiler.models import DTYPES
from btp.runtime.dependencies import require


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="btp-compile", description=__doc__)
    p.add_argument("model", help="Hugging Face checkpoint directory, hub id, or builtin:NAME")
    p.add_argument("--plan", required=True, help="plan file (btp-plan/1 JSON) or preset: none, btp, fastv, pdrop, "
                   "divprune")
    p.add_argument("-o", "--out", required=True, help="artifact directory to create")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="engines to build (default: tensorrt where importable, else onnxruntime)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--max-batch", type=int, default=4, help="largest batch the graphs accept (default: 4)")
    p.add_argument("--max-prompt", type=int, default=1024,
                   help="longest prompt in tokens, image tokens included (default: 1024)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer (default: 256)")
    p.add_argument("--min-image-tokens", type=int, default=0, metavar="N",
                   help="fewest image tokens of one image, for models whose count follows the image's size "
                        "(Qwen2.5-VL): the saved processor resizes every image into the range (default: the "
                        "processor's own bound)")
    p.add_argument("--max-image-tokens", type=int, default=0, metavar="N",
                   help="most image tokens of one image (default: the processor's own bound)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 17..20 (default: 18)")
    p.add_argument("--workspace", type=float, default=4.0, metavar="GIB",
                   help="TensorRT builder workspace limit in GiB, > 0 (default: 4; --backend tensorrt only)")
    p.add_argument("--tf32", action="store_true", help="let TensorRT compute fp32 layers in TF32 (faster, 10-bit "
                   "mantissa inputs; off by default so fp32 engines match the reference; --backend tensorrt only)")
    p.add_argument("--timing-cache", type=Path, metavar="PATH", help="TensorRT timing cache shared across builds: "
                   "read if it exists, rewritten after the build (--backend tensorrt only)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--check", action="store_true", help="run btp-check on the artifact after the build (its bundled "
                   "samples); exit code 1 when it finds a mismatch")
    add_common(p, "print the build (and with --check the check's report) as one JSON object on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console(stderr=args.json, highlight=False)  # with --json, stdout is the result alone
    cfg = BuildConfig(
        model=args.model, plan=args.plan, out=args.out, backend=args.backend, dtype=args.dtype,
        limits=Limits(max_batch=args.max_batch, max_prompt=args.max_prompt, max_new_tokens=args.max_new_tokens,
                      min_image_tokens=args.min_image_tokens, max_image_tokens=args.max_image_tokens),
        opset=args.opset, force=args.force, workspace_gib=args.workspace, tf32=args.tf32,
        timing_cache=args.timing_cache,
    )

    def body() -> int:
        if args.check:
            require("onnxruntime")  # before the build: the check runs the graphs with ONNX Runtime
        t0 = time.perf_counter()
        status = console.status("loading the model")
        status.start()

        def on_graph(name, phase, exported):
            if phase == "start":
                status.update(f"exporting [bold]{name}[/bold]")
            elif phase == "engine":
                status.update(f"building the TensorRT engine of [bold]{name}[/bold]")
            else:
                console.print(f"  exported {name:<8} {exported.nodes:>5} nodes  {exported.seconds:6.1f} s")

        try:
            with stdout_to_stderr(args.json):
                result = compile_artifact(cfg, on_graph)
        finally:
            status.stop()
        doc = _result(result, time.perf_counter() - t0)
        _print(console, doc)
        code = OK
        if args.check:
            # Imported here: the checks live in btp.tools, which the compiler itself does not need.
            from btp.cli.check import print_report
            from btp.tools.check import default_samples, run_check

            images, prompts = default_samples()
            doc["check"] = run_check(result.out, images, prompts)
            print_report(doc["check"], console=console)
            code = OK if doc["check"]["passed"] else FAILED
        if args.json:
            print_json(doc)
        return code

    return run_main(body, args.debug, "btp-compile", {"workspace_gib": "--workspace"}, options=vars(args))


def _result(result, seconds: float) -> dict:
    """What `btp-compile --json` prints: the artifact, its backend, each graph's nodes, bytes and export time, the
    warnings and the plan's stages."""
    files = result.manifest.files
    graphs = [{"name": e.name, "nodes": e.nodes, "seconds": round(e.seconds, 3),
               "bytes": sum(f.size for rel, f in files.items() if rel.startswith(f"onnx/{e.name}.onnx"))}
              for e in result.graphs]
    stages = [{"layer": s["layer"], "keep": s["keep"]} for s in result.manifest.plan.get("stages", [])]
    return {"artifact": str(result.out), "backend": result.backend, "graphs": graphs, "warnings": list(result.warnings),
            "stages": stages, "seconds": round(seconds, 3)}


def _print(console: Console, doc: dict) -> None:
    table = Table("graph", "nodes", "size", "seconds", title=f"{doc['artifact']} ({doc['backend']})")
    for g in doc["graphs"]:
        table.add_row(g["name"], str(g["nodes"]), _human(g["bytes"]), f"{g['seconds']:.1f}")
    console.print(table)
    for w in doc["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}")
    stages = ", ".join(f"{s['keep']}@{s['layer']}" for s in doc["stages"]) or "no pruning"
    console.print(f"plan: {stages} (image tokens kept @ first layer); built in {doc['seconds']:.1f} s")


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


if __name__ == "__main__":
    sys.exit(main())
