"""`btp-bench OUT`: measured speed of a pruned artifact against its unpruned twin, Hugging Face, and the
FLOPs ideal (BTP.md section 5), as ratios measured in one run (these machines are shared and noisy).

The unpruned twin (plan `none`, same model, dtype and bounds) is compiled once and cached beside OUT.
Pruned and unpruned runs interleave (ABAB...) after a warm-up; the Hugging Face baseline is
`LlavaForConditionalGeneration.generate` on the same weights (sdpa attention, greedy) in the same process.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from btp.artifact.manifest import read_manifest
from btp.runtime import Pipeline
from btp.runtime.dependencies import require, require_device
from btp.runtime.errors import InputError
from btp.tools.output import save_figure

from .samples import sample_image

CPU = torch.device("cpu")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cached_artifact(root: Path, manifest, plan, label: str, log=print, backend: str = "onnxruntime") -> Path:
    """`plan` (a preset name or a `Plan`) compiled for OUT's model, dtype and bounds, once, into a cache
    beside OUT keyed by the model fingerprint, the options, the backend and the plan itself."""
    import hashlib

    from .cache import compile_cached

    b = manifest.build
    fp = manifest.model.fingerprint[:16]
    text = plan if isinstance(plan, str) else plan.to_json()
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    key = f"{fp}-{b.dtype}-o{b.opset}-b{b.max_batch}-p{b.max_prompt}-n{b.max_new_tokens}"
    if backend != "onnxruntime":
        key += f"-{backend}"
    out = root.parent / ".btp-bench-cache" / (f"{label}-{key}" if label == "none" else f"{label}-{key}-{digest}")
    return compile_cached(out, manifest.model.name, plan, b.bounds, log, backend=backend, dtype=b.dtype,
                          opset=b.opset, tf32=backend == "tensorrt" and b.tf32 is not False)  # None: TensorRT's default


def unpruned_twin(root: Path, manifest, log=print, backend: str = "onnxruntime") -> Path:
    """The plan-`none` artifact with the same model, dtype, bounds and backend (cached beside OUT)."""
    return cached_artifact(root, manifest, "none", "none", log, backend)


def _clip_flops(model, grid) -> float:
    from btp.compiler.cost import vision_flops

    cfg = model.config
    v = cfg.vision_config
    layer = cfg.vision_feature_layer
    layers = layer if layer >= 0 else v.num_hidden_layers + 1 + layer
    side = v.image_size // v.patch_size
    return vision_flops(side * side, v.hidden_size, v.intermediate_size, layers, v.num_channels * v.patch_size**2,
                        model.hidden_size)


def _qwen_flops(model, grid) -> float:
    from btp.compiler.cost import qwen_vision_flops

    v = model.config.vision_config
    merge = v.spatial_merge_size
    t, h, w = grid or (1, model.grid[0] * merge, model.grid[1] * merge)
    return qwen_vision_flops((t, h, w), v.hidden_size, v.intermediate_size, v.depth, len(v.fullatt_block_indexes),
                             v.in_channels * v.temporal_patch_size * v.patch_size**2, merge,
                             v.window_size // merge // v.patch_size, model.hidden_size)


# Each family's vision tower and projector: (model, image grid (t, h, w) in patches or None) -> FLOPs.
VISION_FLOPS = {"llava": _clip_flops, "qwen2_5_vl": _qwen_flops}


def fixed_flops(model, grid: tuple[int, int, int] | None = None) -> float:
    """FLOPs of the prefill that no plan prunes: vision tower, projector and the LM head's last row. `grid`: the
    image's (t, h, w) patches where the family's image size varies (None: its nominal square image)."""
    return VISION_FLOPS[model.family.name](model, grid) + model.hidden_size * model.config.text_config.vocab_size


def image_geometry(pipe: Pipeline, images, prompts) -> tuple[int, tuple[int, int, int] | None]:
    """(image tokens N, the vision grid (t, h, w) in patches or None for a fixed-size tower) of the first row."""
    enc = pipe.encode(images[:1], prompts[:1])
    n = int((enc["input_ids"][0] == pipe.spec.image_token_id).sum())
    grid = enc["image_grid_thw"][0].tolist() if "image_grid_thw" in enc else None
    return n, (tuple(int(x) for x in grid) if grid is not None else None)


def layer_tokens_at(plan, n: int) -> list[int]:
    """Image tokens alive in each decoder layer `[num_layers]` of an image of `n` tokens (a share plan's keeps at
    `n`; a fixed-size plan's own counts, with `n` its `image_tokens`)."""
    keeps = {s.layer: k for s, (k, _) in zip(plan.stages, plan.stage_counts(n))}
    out, alive = [], n
    for layer in range(plan.model.num_layers):
        alive = keeps.get(layer, alive)
        out.append(alive)
    return out


def plan_flops(plan, n: int, hidden: int, intermediate: int, text_tokens: int) -> float:
    """Prefill FLOPs of the decoder (BTP.md section 5) over `n` image tokens pruned by `plan`, plus the text."""
    from btp.compiler.cost import decoder_flops

    return sum(decoder_flops(k + text_tokens, hidden, intermediate) for k in layer_tokens_at(plan, n))


def make_prompt(tokenizer, text_tokens: int) -> str:
    """A question of about `text_tokens` tokens."""
    words = ["Describe", "the", "colours", "shapes", "and", "positions", "of", "everything", "in", "this", "image"]
    out: list[str] = []
    while len(tokenizer(" ".join(out), add_special_tokens=False)["input_ids"]) < text_tokens:
        out.append(words[len(out) % len(words)])
    return " ".join(out)


def _kv_bytes(pipe: Pipeline, images, prompts) -> int:
    pre = pipe.prefill(images, prompts)
    return sum(t.numel() * t.element_size() for cache in pre.caches.values() for t in cache.values())


class _HfRunner:
    """Hugging Face `generate` on the same weights (sdpa attention, greedy): one `run()` per benchmark round
    gives its time to first token and its decode tokens/s, so that it interleaves with the engine runs."""

    def __init__(self, model, enc, new_tokens: int, device: torch.device = CPU):
        """`enc`: the processor's output for the batch (`Pipeline.encode`), in the family's own Hugging Face form
        (Qwen2.5-VL: flattened patches and `image_grid_thw`); floating tensors in the model's dtype."""
        self.hf = model.hf.to(device)
        self.hf.set_attn_implementation("sdpa")
        self.device = device
        dtype = next(self.hf.parameters()).dtype
        self.kwargs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
                       for k, v in enc.items() if isinstance(v, torch.Tensor)}
        self.kwargs["do_sample"] = False
        self.new_tokens, self.batch = new_tokens, enc["input_ids"].shape[0]
        self._generate(2)  # warm-up

    def _generate(self, n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.hf.generate(**self.kwargs, max_new_tokens=n, min_new_tokens=n)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return (time.perf_counter() - t0) * 1e3

    def run(self) -> dict:
        ttft = self._generate(1)
        full = self._generate(self.new_tokens)
        decode_ms = max(full - ttft, 1e-6)
        return {"ttft_ms": ttft, "decode_tokens_per_s": (self.new_tokens - 1) * self.batch / (decode_ms / 1e3)}


def _summary(runs: list[dict], graphs: list[str]) -> dict:
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {
        "ttft_ms": med("ttft_ms"), "ttft_min_ms": min(r["ttft_ms"] for r in runs),
        "decode_tokens_per_s": med("decode_tokens_per_s"),
        "prefill_ms": {g: med(g) for g in graphs if all(g in r for r in runs)},
    }


def bench(out: str | Path, baselines: set[str], prompt_tokens: int, new_tokens: int, batch: int,
          repeat: int, log=print, rebuild: bool = False, backend: str = "onnxruntime", device: str = "cpu") -> dict:
    """Run the benchmark; returns the report (`btp-bench --json`). `backend` and `device` go to `Pipeline.load`
    for OUT and its unpruned twin (compiled for the same backend); Hugging Face runs on `device` too."""
    from btp.compiler import load_model
    from btp.compiler.plan import Plan

    root = Path(out)
    manifest = read_manifest(root)
    if batch > manifest.build.max_batch:
        raise InputError(f"{batch} exceeds the artifact's max batch {manifest.build.max_batch}", option="batch")
    dev = require_device(device)
    if backend == "tensorrt" and not manifest.engines:
        raise InputError(f"tensorrt: {root} has no TensorRT engines (it was built for onnxruntime)", option="backend")
    pruned = Pipeline.load(root, backend=backend, device=device)
    tok = pruned.processor.tokenizer
    prompt = make_prompt(tok, prompt_tokens)
    images, prompts = [sample_image()] * batch, [prompt] * batch
    pipes = {"pruned": pruned}
    if "unpruned" in baselines:
        twin = unpruned_twin(root, manifest, log, backend)
        if rebuild:
            twin = _rebuild(twin, lambda: unpruned_twin(root, manifest, log, backend))
        pipes["unpruned"] = Pipeline.load(twin, backend=backend, device=device)
    model = load_model(manifest.model.name, dtype=manifest.build.dtype)
    graphs = {name: list(p.engines) for name, p in pipes.items()}
    runners = {name: (lambda p=p: p.generate(images, prompts, max_new_tokens=new_tokens,
                                             min_new_tokens=new_tokens).timings) for name, p in pipes.items()}
    for p in pipes.values():  # warm-up
        p.generate(images, prompts, max_new_tokens=2)
    if "hf" in baselines:
        runners["hf"] = _HfRunner(model, pruned.encode(images, prompts), new_tokens, dev).run
    runs: dict[str, list[dict]] = {name: [] for name in runners}
    for i in range(repeat):
        log(f"round {i + 1}/{repeat}")
        for name, run in runners.items():  # interleaved: pruned, unpruned, hf, pruned, ...
            runs[name].append(dict(run()))
    prompt_len = len(pruned.prepare(images[:1], prompts[:1]).input_ids[0])
    n, grid = image_geometry(pruned, images, prompts)
    text_tokens = prompt_len - n
    report: dict = {"artifact": str(root), "prompt_tokens": prompt_len, "text_tokens": text_tokens,
                    "image_tokens": n, "new_tokens": new_tokens, "batch": batch, "repeat": repeat}
    for name in pipes:
        report[name] = _summary(runs[name], graphs[name])
        report[name]["kv_cache_bytes"] = _kv_bytes(pipes[name], images, prompts)
    plan = Plan.parse(manifest.plan)
    d, inter = manifest.model.hidden_size, manifest.model.intermediate_size
    none = Plan.parse({**manifest.plan, "stages": []})
    fixed = fixed_flops(model, grid)
    flops_pruned, flops_none = plan_flops(plan, n, d, inter, text_tokens), plan_flops(none, n, d, inter, text_tokens)
    report["flops"] = {
        "pruned": flops_pruned, "unpruned": flops_none, "fixed": fixed,
        "ideal_speedup": flops_none / flops_pruned,
        "ideal_ttft_speedup": (fixed + flops_none) / (fixed + flops_pruned),
        "layer_averaged_image_tokens": statistics.fmean(layer_tokens_at(plan, n)),
    }
    p = report["pruned"]
    decoder = lambda r: sum(v for k, v in r["prefill_ms"].items() if k.startswith(("stage", "prune")))  # noqa: E731
    ratios = {"prune_overhead": sum(v for k, v in p["prefill_ms"].items() if k.startswith("prune")) / p["ttft_ms"]}
    if "unpruned" in pipes:
        u = report["unpruned"]
        ratios["speedup"] = u["ttft_ms"] / p["ttft_ms"]
        ratios["efficiency"] = ratios["speedup"] / report["flops"]["ideal_ttft_speedup"]
        ratios["decoder_speedup"] = decoder(u) / decoder(p)
        ratios["decoder_efficiency"] = ratios["decoder_speedup"] / report["flops"]["ideal_speedup"]
        ratios["kv_cache_reduction"] = u["kv_cache_bytes"] / p["kv_cache_bytes"]
        ratios["decode_speedup"] = p["decode_tokens_per_s"] / u["decode_tokens_per_s"]
    if "hf" in baselines:
        hf = _summary(runs["hf"], [])
        del hf["prefill_ms"]
        report["hf"] = hf
        ratios["vs_hf_ttft_pruned"] = p["ttft_ms"] / hf["ttft_ms"]
        ratios["vs_hf_decode_pruned"] = p["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
        if "unpruned" in pipes:
            ratios["vs_hf_ttft_unpruned"] = report["unpruned"]["ttft_ms"] / hf["ttft_ms"]
            ratios["vs_hf_decode_unpruned"] = report["unpruned"]["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
    report["ratios"] = ratios
    report["environment"] = _environment(manifest, backend, dev)
    return report


def _environment(manifest, backend: str = "onnxruntime", device: torch.device = CPU) -> dict:
    env = {
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "backend": backend, "device": str(device), "python": platform.python_version(), "torch": torch.__version__,
        "onnxruntime": require("onnxruntime").__version__, "dtype": manifest.build.dtype,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    if backend == "tensorrt":
        env["tensorrt"] = require("tensorrt").__version__
    return env


def _rebuild(path: Path, compile_again) -> Path:
    import shutil

    shutil.rmtree(path)
    return compile_again()


SWEEP_SHARES = (0.11, 0.15, 0.22, 0.3, 0.35)


def sweep_plans(kind: str, model, names: list[str] | None = None) -> dict:
    """Plans of a sweep: `presets` (every preset) or `budgets` (`btp` scaled to layer-averaged shares of
    `SWEEP_SHARES` that the model's depth can reach, plus `none`). Returns label -> Plan."""
    from btp.compiler.presets import PRESETS, btp_budget, model_info, resolve_plan
    from btp.runtime.errors import PlanError

    plans = {}
    if kind == "presets":
        for name in names or list(PRESETS):
            if name not in PRESETS:
                raise InputError(f"{name!r}: expected presets among {', '.join(PRESETS)}", option="plans")
            try:
                plans[name] = resolve_plan(name, model)
            except PlanError:
                continue  # a preset that does not fit this model's depth is left out of the sweep
    elif kind == "budgets":
        info = model_info(model)
        plans["none"] = resolve_plan("none", model)
        for share in ([float(x) for x in names] if names else SWEEP_SHARES):
            try:
                plans[f"btp@{share:g}"] = btp_budget(info, share)
            except PlanError:
                continue
    else:
        raise InputError(f"expected presets or budgets, got {kind!r}", option="sweep")
    return plans


def sweep(out: str | Path, kind: str, prompt_tokens: int, batch: int, repeat: int, names: list[str] | None = None,
          log=print) -> dict:
    """Compile the plans of `kind` for OUT's model and bounds (cached), and measure each one's time to first
    token, interleaved. Returns {"sweep", "points": [{plan, layer_averaged_image_tokens, flops, ttft_ms, ...}]}."""
    from btp.compiler import load_model
    from btp.compiler.plan import Plan

    root = Path(out)
    manifest = read_manifest(root)
    model = load_model(manifest.model.name, dtype=manifest.build.dtype)
    plans = sweep_plans(kind, model, names)
    if not plans:
        raise InputError(f"{kind}: no plan fits this model", option="sweep")
    own = Plan.parse(manifest.plan)

    def artifact_of(label, plan) -> Path:
        if (plan.score, plan.stages) == (own.score, own.stages):
            return root  # OUT itself is one of the sweep's plans
        return cached_artifact(root, manifest, "none" if label == "none" else plan, label, log)

    pipes = {label: Pipeline.load(artifact_of(label, plan)) for label, plan in plans.items()}
    first = next(iter(pipes.values()))
    prompt = make_prompt(first.processor.tokenizer, prompt_tokens)
    images, prompts = [sample_image()] * batch, [prompt] * batch
    n, grid = image_geometry(first, images, prompts)
    text_tokens = len(first.prepare(images[:1], prompts[:1]).input_ids[0]) - n
    ttft: dict[str, list[float]] = {label: [] for label in pipes}
    for p in pipes.values():
        p.generate(images, prompts, max_new_tokens=1)
    for i in range(repeat):
        log(f"round {i + 1}/{repeat}")
        for label, p in pipes.items():
            ttft[label].append(p.generate(images, prompts, max_new_tokens=1).timings["ttft_ms"])
    d, inter = model.hidden_size, model.intermediate_size
    fixed = fixed_flops(model, grid)
    points = [{"plan": label, "layer_averaged_image_tokens": statistics.fmean(layer_tokens_at(plan, n)),
               "flops": fixed + plan_flops(plan, n, d, inter, text_tokens), "ttft_ms": statistics.median(ttft[label]),
               "ttft_min_ms": min(ttft[label])} for label, plan in plans.items()]
    return {"artifact": str(root), "sweep": kind, "batch": batch, "repeat": repeat, "text_tokens": text_tokens,
            "points": points, "environment": _environment(manifest)}


def plot_sweep(report: dict, path: str | Path) -> Path:
    """TTFT against layer-averaged image tokens, one labelled point per plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(report["points"], key=lambda q: q["layer_averaged_image_tokens"])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    x = [q["layer_averaged_image_tokens"] for q in pts]
    y = [q["ttft_ms"] for q in pts]
    ax.plot(x, y, "o-" if report["sweep"] == "budgets" else "o", color="#7aa6d8")
    for q in pts:
        ax.annotate(q["plan"], (q["layer_averaged_image_tokens"], q["ttft_ms"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel("layer-averaged image tokens")
    ax.set_ylabel("time to first token, median (ms)")
    ax.set_title(f"btp-bench --sweep {report['sweep']} (batch {report['batch']})")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot(report: dict, path: str | Path) -> Path:
    """Per-graph prefill breakdown of both plans, and the ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = [k for k in ("pruned", "unpruned") if k in report]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, name in enumerate(plans):
        bottom = 0.0
        for g, ms in report[name]["prefill_ms"].items():
            color = "#d9534f" if g.startswith("prune") else ("#7aa6d8" if g.startswith("stage") else "#999999")
            left.bar(i, ms, bottom=bottom, color=color, edgecolor="white", lw=0.5)
            if ms > 0.04 * report[name]["ttft_ms"]:
                left.text(i, bottom + ms / 2, g, ha="center", va="center", fontsize=7)
            bottom += ms
    if "hf" in report:
        left.bar(len(plans), report["hf"]["ttft_ms"], color="#5cb85c")
        plans = [*plans, "hf"]
    left.set_xticks(range(len(plans)), plans)
    left.set_ylabel("prefill / time to first token (ms)")
    left.set_title("prefill by graph (median)")
    ratios = report["ratios"]
    right.barh(list(ratios), list(ratios.values()), color="#7aa6d8")
    for y, v in enumerate(ratios.values()):
        right.text(v, y, f" {v:.3g}", va="center", fontsize=7)
    right.axvline(1.0, color="black", lw=0.8)
    right.set_title("ratios")
    fig.tight_layout()
    return save_figure(fig, path)
