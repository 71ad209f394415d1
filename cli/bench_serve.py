"""`btp-bench-serve ARTIFACT`: N concurrent clients against one on loopback (`btp.serve.bench`): requests/s,
output tokens/s, TTFT p50/p99 and their ratios, a table or `--json`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from btp.cli.common import add_common, emit, run_main
from btp.runtime.errors import InputError
from btp.serve.bench import SCENE, bench


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="btp-bench-serve", description=__doc__)
    p.add_argument("artifact", help="artifact directory written by btp-compile")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients of the loaded run (default: 8)")
    p.add_argument("--requests", type=int, default=48, help="requests per run (default: 48)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds a run may take at most (default: 60)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per answer, forced (min_tokens)")
    p.add_argument("--image", default=SCENE, help="image file to ask about (default: the bundled toy scene)")
    p.add_argument("--prompt", default="Where is the white circle?", help="question")
    p.add_argument("--threads", type=int, default=0, help="the server's ONNX Runtime threads (0 = its choice)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="the server's batching window")
    add_common(p)
    return p


def show(report: dict) -> None:
    cols = ["clients", "requests", "requests_per_s", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms"]
    print(" | ".join(cols))
    for run in report["runs"]:
        print(" | ".join(str(run[c]) for c in cols))
    print("ratios N vs 1: " + ", ".join(f"{k} {v}x" for k, v in report["ratios"].items()))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        if not Path(args.artifact, "manifest.json").is_file():
            raise InputError(f"{args.artifact}: expected an artifact directory with a manifest.json, found none")
        if args.clients < 1 or args.requests < 1 or args.max_new_tokens < 1:
            raise InputError("--clients, --requests and --max-new-tokens: expected >= 1")
        return emit(bench(args), args.json, show)

    return run_main(body, args.debug, "btp-bench-serve", options=vars(args))


if __name__ == "__main__":
    sys.exit(main())
