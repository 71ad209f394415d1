"""`btp-bench-quality MODEL`: how much of a model's answers each plan keeps, on the toy task's test split.

Every plan is compiled (ONNX Runtime, cached beside the report) and answers the held-out test split of
`btp.toy.task` with greedy decoding; the table gives exact-match accuracy, retained performance
(pruned / unpruned accuracy), agreement with the unpruned model's answers, layer-averaged image tokens and the
decoder FLOPs ratio per plan, the way the paper reports retained benchmark performance against its budget sweep.
Presets run at their own budget or, with `--budgets`, scaled to each layer-averaged share; `--calibrate` adds
`btp-calibrate` plans made from the task's train split at the same shares, each compared with the best preset at
its share by an exact McNemar test on the same questions; `--baselines` adds random and uniform-grid selections
of the same number of tokens at layer 0.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections import Counter
from pathlib import Path

from btp.runtime.errors import InputError, PlanError
from btp.tools.output import save_figure
from btp.toy import task as toy_task

PRESET_NAMES = ("none", "btp", "fastv", "pdrop", "divprune")
BASELINES = ("random", "grid")
SIGNIFICANCE = 0.05  # a difference is called significant when McNemar's exact two-sided p is below this
ANSWER_TOKENS = 6  # the longest answer ("bottom right") is three tokens; EOS ends the others early


def normalise(text: str) -> str:
    """The comparable form of an answer: lower case, outer blanks and a final full stop removed."""
    return text.strip().lower().rstrip(".").strip()


def write_calibration_set(out: Path, n: int) -> Path:
    """The first `n` train-split samples as a `btp-calibrate --data` directory (images + prompts.jsonl)."""
    out.mkdir(parents=True, exist_ok=True)
    index = out / "prompts.jsonl"
    if index.is_file() and sum(1 for _ in index.open()) == n:
        return out
    lines = []
    for i, s in enumerate(toy_task.make_split("train", n)):
        name = f"train-{i:05d}.png"
        s.image.save(out / name)
        lines.append(json.dumps({"image": name, "prompt": s.question}))
    index.write_text("\n".join(lines) + "\n")
    return out


def _plan_jobs(model, key: str, plans: list[str], budgets: list[float] | None, calibrate: list[str], cache: Path,
               calibration_samples: int, log, baselines: list[str] = ()) -> list[dict]:
    """(label, method, budget, Plan or the reason it has none) for every row of the table."""
    from btp.compiler import model_info, resolve_plan
    from btp.compiler.presets import at_budget

    info = model_info(model)
    jobs = []
    for name in plans:
        if name == "none":
            jobs.append({"plan": "none", "method": "none", "budget": None, "spec": resolve_plan("none", model)})
        elif name in PRESET_NAMES:
            for share in budgets or [None]:
                label = name if share is None else f"{name}@{share:g}"
                try:
                    plan = resolve_plan(name, model) if share is None else at_budget(name, info, share)
                except PlanError as err:
                    jobs.append({"plan": label, "method": name, "budget": share, "skipped": str(err)})
                    continue
                jobs.append({"plan": label, "method": name, "budget": share, "spec": plan})
        else:
            try:
                plan = resolve_plan(name, model)
            except PlanError as err:
                raise InputError(f"{name}: {err}", option="plans") from None
            jobs.append({"plan": Path(name).stem, "method": "file", "budget": None, "spec": plan})
    for method in calibrate:
        for share in budgets or []:
            jobs.append(_calibrated(model, key, method, share, cache, calibration_samples, log))
    for name in baselines:
        for share in budgets or []:
            jobs.append(_baseline(info, name, share))
    return jobs


def _baseline(info, name: str, share: float) -> dict:
    """`random@SHARE` or `grid@SHARE`: `round(SHARE * N0)` image tokens kept from layer 0 on, drawn uniformly at
    random per question (a seeded torch selection, run on the PyTorch reference) or on the farthest-point grid
    of the spatial seeds (a plan, compiled like the others)."""
    from btp.compiler.plan import FORMAT, Plan, Stage

    keep = max(1, round(share * info.image_tokens))
    stage = Stage(layer=0, keep=keep, spatial=keep if name == "grid" else 0)
    plan = Plan(format=FORMAT, model=info, stages=(stage,), calibration={"method": f"baseline:{name}@{share:g}"})
    return {"plan": f"{name}@{share:g}", "method": name, "budget": share, "spec": plan, "random": name == "random"}


def model_key(model) -> str:
    """The cache key of a model's plans and artifacts: its config fingerprint and a digest of its weights. The
    fingerprint alone names the architecture, which a retrained model shares with its predecessor; accuracy
    and calibration depend on the weights."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.hf.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{model.fingerprint[:16]}-{h.hexdigest()[:12]}"


def _calibrated(model, key: str, method: str, share: float, cache: Path, samples: int, log) -> dict:
    """A `btp-calibrate --method METHOD --retention SHARE` plan from the train split (its default settings
    otherwise), cached.

    The paper's four stages first; on a shallow model, where four stages after layer 1 cannot get down to
    SHARE, three, two and then one stage. Skipped, with the reason for the most stages, when none can."""
    from btp.compiler.calibrate import Target, calibrate
    from btp.compiler.calibration_data import load_samples
    from btp.compiler.plan import Plan

    label = f"calibrated-{method}@{share:g}"
    data = None
    error = ""
    for stages in (4, 3, 2, 1):
        out = cache / f"{key}-{label}-s{stages}-n{samples}-v2.plan.json"  # v2: the plan space of issue 20
        if not out.is_file():
            if stages >= model.num_layers:
                continue
            # written out, so that `btp-calibrate --data DIR` reproduces the row from the same samples
            data = data or write_calibration_set(cache / f"calibration-n{samples}", samples)
            log(f"calibrating {label} ({stages} stages) on {samples} train samples")
            try:
                result = calibrate(model, load_samples(str(data), samples), Target(retention=share), method,
                                   stages=stages, source={"data": str(data), "seed": 0})
            except PlanError as err:
                error = error or str(err)  # the most stages' reason
                continue
            result.plan.save(out)
        return {"plan": label, "method": f"calibrated-{method}", "budget": share, "calibrated_stages": stages,
                "spec": Plan.load(out)}
    return {"plan": label, "method": f"calibrated-{method}", "budget": share,
            "skipped": f"out of reach with 4 to 1 stages: {error}"}


def _artifact(model, key: str, plan, cache: Path, batch: int, log) -> Path:
    from btp.runtime.chain import Bounds

    from .cache import compile_cached

    digest = hashlib.sha256(plan.to_json().encode()).hexdigest()[:10]
    bounds = Bounds(max_batch=batch, max_prompt=model.image_tokens + 64, max_new_tokens=ANSWER_TOKENS)
    return compile_cached(cache / f"{key}-b{batch}-{digest}", model.name, plan, bounds, log)


class _RandomSelection:
    """An engine standing in for a prune graph: keeps its `keep` image tokens drawn uniformly at random per row
    (from a seeded generator), in ascending order; the random baseline, never exported."""

    def __init__(self, engine, seed: int = 0):
        import torch

        self.name, self.input_names, self.output_names = engine.name, engine.input_names, engine.output_names
        self.recipe = engine.module.recipe
        self.generator = torch.Generator().manual_seed(seed)

    def run(self, feeds: dict) -> dict:
        import torch

        from btp.graphs.prune import keep_rows

        hidden = feeds["hidden_states"]  # [B,T,D]
        alive, keep = self.recipe.alive, self.recipe.keep
        draw = torch.rand(hidden.shape[0], alive, generator=self.generator)  # [B,N]
        kept = draw.topk(keep, dim=1).indices.sort(dim=1).values  # [B,keep]
        rows = keep_rows(hidden, feeds["position_ids"], feeds["attention_mask"], feeds["image_start"], kept, alive)
        return dict(zip(self.output_names, (*rows, kept)))


def random_pipeline(model, plan):
    """The PyTorch reference of `plan` with every prune graph replaced by a random selection of its counts."""
    from btp.compiler import reference_pipeline

    pipe = reference_pipeline(model, plan)
    for prune in pipe.spec.prunes:
        pipe.engines[prune.prune] = _RandomSelection(pipe.engines[prune.prune])
    return pipe


def mcnemar(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pairs: questions only plan A answers right (`only_a`)
    and only plan B does (`only_b`); `min(1, 2 * P[X <= min])` with X ~ Binomial(only_a + only_b, 1/2)."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def compare(rows: list[dict], correct: dict[str, list[bool]]) -> list[dict]:
    """Each calibrated row against the most accurate preset at the same budget, question by question
    (`correct[plan]`: one bool per test question): the accuracy difference, the discordant counts and McNemar's
    exact p-value; `significant` when p < SIGNIFICANCE."""
    out = []
    for row in rows:
        if not row["method"].startswith("calibrated") or row["plan"] not in correct:
            continue
        peers = [r for r in rows if r["method"] in PRESET_NAMES[1:] and r["budget"] == row["budget"]
                 and r["plan"] in correct]
        if not peers:
            continue
        best = max(peers, key=lambda r: r["accuracy"])
        mine, theirs = correct[row["plan"]], correct[best["plan"]]
        only_a = sum(a and not b for a, b in zip(mine, theirs))
        only_b = sum(b and not a for a, b in zip(mine, theirs))
        p = mcnemar(only_a, only_b)
        out.append({"plan": row["plan"], "against": best["plan"], "budget": row["budget"],
                    "accuracy_difference": row["accuracy"] - best["accuracy"], "only_plan": only_a,
                    "only_against": only_b, "p_value": p, "significant": p < SIGNIFICANCE})
    return out


def evaluate(pipe, samples, batch: int) -> dict:
    """Greedy answers of `pipe` over `samples` -> accuracy overall and per question kind, the answers and which
    were right."""
    right, total, answers, correct = Counter(), Counter(), [], []
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        out = pipe.generate([s.image for s in chunk], [s.question for s in chunk], max_new_tokens=ANSWER_TOKENS)
        for s, text in zip(chunk, out.texts):
            ok = normalise(text) == normalise(s.answer)
            right[s.kind] += ok
            total[s.kind] += 1
            answers.append(text)
            correct.append(ok)
    accuracy = sum(right.values()) / max(1, len(samples))
    return {"accuracy": accuracy, "per_kind": {k: right[k] / total[k] for k in sorted(total)}, "answers": answers,
            "correct": correct}


def quality(model_name: str, plans: list[str], budgets: list[float] | None = None, calibrate: list[str] = (),
            samples: int | None = None, batch: int = 16, cache: str | Path = "build/quality",
            calibration_samples: int = 64, log=print, baselines: list[str] = ()) -> dict:
    """Run the quality benchmark; returns the report (`btp-bench-quality --json`): one row per plan and the
    calibrated plans' paired comparisons with the best preset at their budget."""
    from btp.compiler import load_model, resolve_plan
    from btp.runtime import Pipeline

    model = load_model(model_name)
    cache = Path(cache)
    test = toy_task.make_split("test", samples)
    key = model_key(model)  # once: it hashes every weight
    jobs = _plan_jobs(model, key, plans, budgets, list(calibrate), cache, calibration_samples, log, list(baselines))
    none = resolve_plan("none", model)
    d, m = model.hidden_size, model.intermediate_size
    rows, answers, correct = [], {}, {}
    for job in jobs:
        row = {k: v for k, v in job.items() if k not in ("spec", "random")}
        if "skipped" in job:
            log(f"{job['plan']}: skipped ({job['skipped']})")
            rows.append(row)
            continue
        plan = job["spec"]
        pipe = random_pipeline(model, plan) if job.get("random") else Pipeline.load(
            _artifact(model, key, plan, cache, batch, log))
        text = statistics.mean(len(pipe.prepare([s.image], [s.question]).input_ids[0]) for s in test[:8])
        text -= model.image_tokens
        t0 = time.perf_counter()
        result = evaluate(pipe, test, batch)
        answers[job["plan"]], correct[job["plan"]] = [normalise(a) for a in result["answers"]], result["correct"]
        row.update({
            "layer_averaged_image_tokens": plan.average_image_tokens(),
            "image_token_share": plan.average_image_tokens() / model.image_tokens,
            "flops_ratio": plan.flops(d, m, text) / none.flops(d, m, text),
            "accuracy": result["accuracy"], "per_kind": result["per_kind"],
            "seconds": time.perf_counter() - t0,
            "stages": [{"layer": s.layer, "keep": s.keep, "spatial": s.spatial, "attention": s.attention}
                       for s in plan.stages],
        })
        log(f"{job['plan']}: accuracy {result['accuracy']:.3f} at {row['layer_averaged_image_tokens']:.1f} "
            "layer-averaged image tokens")
        rows.append(row)
    base = next((r["accuracy"] for r in rows if r["plan"] == "none" and "accuracy" in r), None)
    for r in rows:
        if base and "accuracy" in r:
            r["retained"] = r["accuracy"] / base
        if "none" in answers and r["plan"] in answers:
            r["agreement"] = sum(a == b for a, b in zip(answers[r["plan"]], answers["none"])) / len(test)
    return {"model": model_name, "samples": len(test), "image_tokens": model.image_tokens,
            "num_layers": model.num_layers, "budgets": budgets, "rows": rows, "comparisons": compare(rows, correct),
            "significance": SIGNIFICANCE}


def plot(report: dict, path: str | Path) -> Path:
    """Retained performance against layer-averaged image tokens, one series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods: dict[str, list[dict]] = {}
    for r in report["rows"]:
        if "retained" in r:
            methods.setdefault(r["method"], []).append(r)
    markers = iter("osD^v<>pP*X")
    for method, rows in methods.items():
        rows.sort(key=lambda r: r["layer_averaged_image_tokens"])
        ax.plot([r["layer_averaged_image_tokens"] for r in rows], [100 * r["retained"] for r in rows],
                marker=next(markers, "o"), label=method, lw=1)
    ax.axhline(100, color="black", lw=0.6)
    ax.set_xlabel(f"layer-averaged image tokens (of {report['image_tokens']})")
    ax.set_ylabel("retained accuracy (% of unpruned)")
    ax.set_title(f"{report['model']}: {report['samples']} test questions")
    ax.grid(alpha=0.3)
    if methods:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
