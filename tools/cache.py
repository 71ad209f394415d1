"""The one compile cache of the benchmarks: a plan compiled once into a directory named by what it depends on."""

from __future__ import annotations

from pathlib import Path


def compile_cached(out: Path, model: str, plan, bounds, log=print, backend: str = "onnxruntime",
                   dtype: str = "float32", opset: int = 18, tf32: bool = False) -> Path:
    """`plan` (a preset name or a `Plan`) compiled for `model` under `bounds` (`runtime.chain.Bounds`) into `out`,
    unless `out` already holds an artifact. `out`'s name must say everything the build depends on."""
    from btp.compiler.build import BuildConfig, compile_artifact

    if (out / "manifest.json").is_file():
        return out
    label = plan if isinstance(plan, str) else plan.calibration.get("method", "plan")
    log(f"compiling {label} (cached in {out.parent.name}/{out.name})")
    spec = plan
    if not isinstance(plan, str):
        out.parent.mkdir(parents=True, exist_ok=True)
        spec = str(out.parent / f"{out.name}.plan.json")
        plan.save(spec)
    compile_artifact(BuildConfig(model=model, plan=spec, out=out, backend=backend, dtype=dtype, opset=opset,
                                 force=True, tf32=tf32, limits=bounds))
    return out
