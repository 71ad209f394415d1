"""The GPU runbook behind `btp-gpu-check` (`python -m btp.cli.gpu_check`), for a person with an NVIDIA GPU.

After `pip install -e '.[gpu,dev]'` on a CUDA host it builds TensorRT engines of the builtin models for every
preset in fp32 and fp16, runs `btp-check` on each (torch vs ONNX Runtime vs the TensorRT engines, and the
pipeline's greedy tokens end to end), times each model's fp32 `btp` artifact with `btp-bench` on ONNX Runtime's CUDA
provider and on the TensorRT engines (against its unpruned twin and Hugging Face on the GPU), runs the test
suite's `gpu` tests (`pytest -m gpu`: the reference on CUDA
against Hugging Face on CUDA, ONNX Runtime's CUDA binding, the engines against ONNX Runtime), and writes one JSON
report. Nothing here has run yet: the project's machines have no GPU.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from btp.runtime.dependencies import importable, require

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
