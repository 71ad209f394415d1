import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from btp.compiler import load_model
from btp.tools.samples import sample_image


@pytest.fixture(scope="session")
def tiny():
    """builtin:tiny-llava in fp32 (shared; tests must not modify it)."""
    return load_model("builtin:tiny-llava")


@pytest.fixture(scope="session")
def images():
    """Two different images: the bundled sample and a synthetic gradient."""
    grad = Image.linear_gradient("L").resize((48, 40)).convert("RGB")
    return [sample_image(), grad]


# Small bounds keep the exported graphs and the tests quick.
LIMITS = dict(max_batch=4, max_prompt=256, max_new_tokens=64)


def _is_xdist_worker(config) -> bool:
    """Whether this session is a pytest-xdist worker's (its environment variable also reaches the processes
    that tests start, so it is not asked)."""
    return hasattr(config, "workerinput")


# Under pytest-xdist (`make test` runs 2 workers) each worker's torch takes one thread: two workers with one
# thread each on 2 cores beat two that fight over both. Reset after each test (btp-train-toy sets its own).
WORKER_THREADS = 1


def pytest_configure(config):
    if _is_xdist_worker(config):
        import torch

        torch.set_num_threads(WORKER_THREADS)


def pytest_runtest_teardown(item):
    if _is_xdist_worker(item.config):
        import torch

        if torch.get_num_threads() != WORKER_THREADS:
            torch.set_num_threads(WORKER_THREADS)


@contextmanager
def _exclusive(path: Path):
    """An advisory lock on `path` held by this process: the xdist workers of one run take turns through it."""
    import fcntl  # POSIX, as pytest-xdist's sharing here needs; a run without workers never gets here

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def build_once(tmp_path_factory, pytestconfig):
    """Factory: `build_once(key, build, name)` runs `build(out)` for a path `out` named `name` in a new folder,
    once per test run, and returns `out`; what it built is shared by the session's tests, which must copy it
    before they change it. `key` names the build (a file name), distinct for distinct builds.

    Under pytest-xdist each worker has a session of its own: the first worker to ask builds under a lock in the
    run's shared temporary folder, the others wait for it, and each worker gets a copy of its own (a few MB), so
    that what a session puts beside `out` (btp-bench's cache of twins, build locks) stays that session's."""
    worker = _is_xdist_worker(pytestconfig)
    root = tmp_path_factory.getbasetemp().parent / "built-once"  # xdist: <run>/popen-gwN is a worker's basetemp
    if worker:
        root.mkdir(exist_ok=True)
    done: dict[str, Path] = {}

    def get(key: str, build, name: str = "out") -> Path:
        if key in done:
            return done[key]
        if not worker:
            out = tmp_path_factory.mktemp(key) / name
            build(out)
        else:
            shared = root / key / name
            with _exclusive(root / f"{key}.lock"):
                if not (root / f"{key}.done").exists():
                    shutil.rmtree(root / key, ignore_errors=True)  # what a failed try left
                    (root / key).mkdir()
                    build(shared)
                    (root / f"{key}.done").touch()
            out = tmp_path_factory.mktemp(key) / name
            shutil.copytree(shared, out, symlinks=True)
        done[key] = out
        return out

    return get


@pytest.fixture(scope="session")
def artifact(build_once):
    """Factory: the compiled builtin:tiny-llava artifact for a preset, built once per test run."""
    from btp.compiler.build import BuildConfig, compile_artifact
    from btp.compiler.export import Limits

    def get(preset: str):
        def build(out):
            compile_artifact(BuildConfig(model="builtin:tiny-llava", plan=preset, out=out, backend="onnxruntime",
                                         limits=Limits(**LIMITS)))

        return build_once(f"tiny-llava-{preset}", build, preset)

    return get


@pytest.fixture(scope="session")
def fp16_artifact(build_once):
    """builtin:tiny-llava compiled in float16 with plan btp (the conftest bounds), built once per test run."""
    from btp.compiler.build import BuildConfig, compile_artifact
    from btp.compiler.export import Limits

    def build(out):
        compile_artifact(BuildConfig(model="builtin:tiny-llava", plan="btp", out=out, backend="onnxruntime",
                                     dtype="float16", limits=Limits(**LIMITS)))

    return build_once("tiny-llava-btp-float16", build, "btp")


@pytest.fixture(scope="session")
def assert_concurrent_calls_match_sequential():
    """The check as a fixture: tests/ is not a package, so a plain import would not resolve."""
    return _assert_concurrent_calls_match_sequential


def _assert_concurrent_calls_match_sequential(pipe, images):
    """4 threads each running 3 `generate` calls on one Pipeline give the tokens of running them one by one."""
    prompts = [["What is shown?", "Describe."], ["Where is the red circle?", "Hi"], ["Colours?", "Shapes?"]]
    expected = [pipe.generate(images, p, max_new_tokens=6).token_ids for p in prompts]

    def worker(_):
        return [pipe.generate(images, p, max_new_tokens=6).token_ids for p in prompts]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(worker, range(4)))
    assert all(r == expected for r in results)


@pytest.fixture(scope="session")
def tiny_qwen():
    """builtin:tiny-qwen2.5-vl in fp32 (shared; tests must not modify it)."""
    return load_model("builtin:tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def perturbed_head():
    """`perturb(artifact, root) -> root`: a copy of `artifact` at `root` whose LM head weight is 1% larger (small
    enough to keep the file loadable), its manifest re-signed so that only the numbers differ."""
    return _perturbed_head


def _perturbed_head(artifact: Path, root: Path) -> Path:
    import json

    import onnx
    from onnx import numpy_helper

    from btp.artifact.manifest import MANIFEST, file_table

    shutil.copytree(artifact, root)
    path = root / "onnx" / "head.onnx"
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.ndim == 2:  # the LM head weight
            init.CopyFrom(numpy_helper.from_array((arr * 1.01).astype(arr.dtype), init.name))
    onnx.save(model, str(path))
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["files"] = {k: v.model_dump() for k, v in file_table(root).items()}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root
