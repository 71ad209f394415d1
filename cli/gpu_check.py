"""`btp-gpu-check`: the GPU runbook (`btp.tools.gpu_check`): engines, checks, benchmarks and `pytest -m gpu` on a
CUDA host, one JSON report; exit 1 when anything failed."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from btp.cli.common import FAILED, OK, add_common, check_writable, print_json, run_main, stdout_to_stderr
from btp.runtime.dependencies import require, require_device
from btp.runtime.errors import InputError
from btp.tools.gpu_check import DTYPES, MODELS, PRESETS, bench_on_gpu, build_and_check, environment


def _matrix(models: str, presets: str, dtypes: str) -> tuple[list[str], list[str], list[str]]:
    """The comma lists of `--models`, `--presets` and `--dtypes`, each entry checked before any build: a
    missing model or an unknown preset is bad input (exit 2), not a failing artifact (exit 1)."""
    from btp.compiler.models import DTYPES as KNOWN_DTYPES
    from btp.compiler.presets import PRESETS as KNOWN_PRESETS
    from btp.toy.builtins import BUILTINS

    lists = [[x.strip() for x in text.split(",") if x.strip()] for text in (models, presets, dtypes)]
    for option, values in zip(("--models", "--presets", "--dtypes"), lists):
        if not values:
            raise InputError(f"{option}: expected a comma list, found none")
    for model in lists[0]:
        if model.startswith("builtin:"):
            known = model.removeprefix("builtin:") in BUILTINS
        else:  # a checkpoint directory, or a hub id (one slash, not a path)
            hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
            known = hub_id or Path(model).expanduser().is_dir()
        if not known:
            raise InputError(f"--models {model}: expected builtin:NAME ({', '.join(BUILTINS)}), a checkpoint "
                             "directory or a hub id, found none of these")
    for preset in lists[1]:
        if preset not in KNOWN_PRESETS and not Path(preset).is_file():
            raise InputError(f"--presets {preset}: expected one of {', '.join(KNOWN_PRESETS)} or a plan file")
    for dtype in lists[2]:
        if dtype not in KNOWN_DTYPES:
            raise InputError(f"--dtypes {dtype}: expected one of {', '.join(KNOWN_DTYPES)}")
    return lists[0], lists[1], lists[2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="btp-gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="build/gpu-check.json", help="the JSON report (default: %(default)s)")
    p.add_argument("--work", default="build/gpu", help="where the artifacts go (default: %(default)s)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--no-pytest", action="store_true", help="skip `pytest -m gpu`")
    p.add_argument("--no-bench", action="store_true", help="skip the btp-bench runs")
    add_common(p, "print the report (also written to --out) as one JSON object on stdout")
    args = p.parse_args(argv)

    def body() -> int:
        check_writable(args.out, "--out", parents=True)
        models, presets, dtypes = _matrix(args.models, args.presets, args.dtypes)
        require_device("cuda")  # a one-line DependencyError (exit 2) on a machine without one
        require("tensorrt")
        log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        report = {"environment": environment(), "artifacts": [], "bench": [], "pytest_gpu": None}
        with stdout_to_stderr(args.json):
            for model in models:
                for preset in presets:
                    for dtype in dtypes:
                        entry = build_and_check(model, preset, dtype, Path(args.work), log)
                        report["artifacts"].append(entry)
                        if (preset, dtype) == ("btp", "float32") and "error" not in entry and not args.no_bench:
                            report["bench"] += bench_on_gpu(entry, log)
        if not args.no_pytest:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs"], capture_output=True,
                                  text=True)
            report["pytest_gpu"] = {"returncode": proc.returncode, "tail": proc.stdout.splitlines()[-15:]}
        report["passed"] = all(a.get("passed") for a in report["artifacts"]) and (
            report["pytest_gpu"] is None or report["pytest_gpu"]["returncode"] == 0) and not any(
            "error" in b for b in report["bench"])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        log(f"wrote {args.out}: {'PASS' if report['passed'] else 'FAIL'}")
        if args.json:
            print_json(report)
        return OK if report["passed"] else FAILED

    return run_main(body, args.debug, "btp-gpu-check", options=vars(args))


if __name__ == "__main__":
    sys.exit(main())
