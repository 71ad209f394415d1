"""`python -m btp.tools.gpu_check`: the GPU runbook, one command for a person with an NVIDIA GPU.

After `pip install -e '.[gpu,dev]'` on a CUDA host it builds TensorRT engines of the builtin models for every
preset in fp32 and fp16, runs `btp-check` on each (torch vs ONNX Runtime vs the TensorRT engines, and the
pipeline's greedy tokens end to end), times each model's fp32 `btp` artifact with `btp-bench` on ONNX Runtime's CUDA
provider and on the TensorRT engines (against its unpruned twin and Hugging Face on the GPU), runs the test
suite's `gpu` tests (`pytest -m gpu`: the reference on CUDA
against Hugging Face on CUDA, ONNX Runtime's CUDA binding, the engines against ONNX Runtime), and writes one JSON
report. Nothing here has run yet: the project's machines have no GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from btp.runtime.cli import FAILED, OK, add_common, check_writable, print_json, run_main, stdout_to_stderr
from btp.runtime.dependencies import importable, require, require_device
from btp.runtime.errors import InputError

MODELS = ("builtin:tiny-llava", "builtin:toy-vlm")
PRESETS = ("none", "btp", "fastv", "pdrop", "divprune")
DTYPES = ("float32", "float16")


def environment() -> dict:
    """What the report says about the host: versions, the GPU, the providers."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "tensorrt": None, "onnxruntime": None, "providers": []}
    if importable("tensorrt"):
        env["tensorrt"] = require("tensorrt").__version__
    if importable("onnxruntime"):
        ort = require("onnxruntime")
        env["onnxruntime"], env["providers"] = ort.__version__, ort.get_available_providers()
    return env


def build_and_check(model: str, preset: str, dtype: str, root: Path, log) -> dict:
    """One TensorRT artifact, then `btp-check` on it: the check's verdict, failures and times."""
    from btp.compiler.build import BuildConfig, compile_artifact
    from btp.compiler.export import Limits
    from btp.tools.check import check_artifact
    from btp.tools.samples import TOY_QUESTION, sample_image, toy_scene

    out = root / f"{model.split(':')[-1]}-{preset}-{dtype}"
    entry = {"model": model, "plan": preset, "dtype": dtype, "artifact": str(out)}
    t0 = time.perf_counter()
    try:
        compile_artifact(BuildConfig(model=model, plan=preset, out=out, backend="tensorrt", dtype=dtype, force=True,
                                     limits=Limits(max_batch=2, max_prompt=512, max_new_tokens=32)))
        entry["build_s"] = round(time.perf_counter() - t0, 1)
        toy = model == "builtin:toy-vlm"
        images = [toy_scene()] if toy else [sample_image()]
        prompts = [TOY_QUESTION] if toy else ["What is shown in the image?"]
        t1 = time.perf_counter()
        report = check_artifact(out, images, prompts, steps=8)
        entry.update(check_s=round(time.perf_counter() - t1, 1), passed=report["passed"],
                     runners=report["runners"], tokens=report["tokens"],
                     failures=[f for g in report["graphs"] for f in g["failures"]][:10])
    except Exception as err:  # noqa: BLE001 - one failing build must not hide the others' results
        entry.update(passed=False, error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    log(f"{model} {preset} {dtype}: {'pass' if entry.get('passed') else 'FAIL'}")
    return entry


def bench_on_gpu(entry: dict, log) -> list[dict]:
    """`btp-bench` of one artifact with each GPU backend available here: its ratios and times, or the error."""
    from btp.tools.bench import bench

    backends = ["tensorrt"]
    if "CUDAExecutionProvider" in (require("onnxruntime").get_available_providers()):
        backends.insert(0, "onnxruntime")
    out = []
    for backend in backends:
        row = {"artifact": entry["artifact"], "backend": backend}
        try:
            report = bench(entry["artifact"], {"unpruned", "hf"}, 64, 32, 1, 5, log=log, backend=backend,
                           device="cuda")
            row.update(ttft_ms={k: report[k]["ttft_ms"] for k in ("pruned", "unpruned", "hf")},
                       ratios=report["ratios"])
        except Exception as err:  # noqa: BLE001 - report it and go on with the next backend
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        log(f"bench {entry['model']} {backend}: {'error' if 'error' in row else 'done'}")
        out.append(row)
    return out


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

    return run_main(body, args.debug, "btp-gpu-check")


if __name__ == "__main__":
    sys.exit(main())
