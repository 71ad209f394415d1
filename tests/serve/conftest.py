"""What the serving tests share: one compiled builtin:toy-vlm (the demo's plan, max batch 8) per session, its
Pipeline, and real uvicorn servers on loopback ports running in this process."""

from importlib import resources

import pytest
from serving import LIMITS, LiveServer


@pytest.fixture(scope="session")
def toy_artifact(build_once):
    """builtin:toy-vlm compiled with the demo's plan (20 then 13 of 81 image tokens kept), once per test run."""
    from btp.compiler.build import BuildConfig, compile_artifact
    from btp.compiler.export import Limits
    from btp.tools.samples import toy_plan_path

    def build(out):
        compile_artifact(BuildConfig(model="builtin:toy-vlm", plan=str(toy_plan_path()), out=out,
                                     backend="onnxruntime", limits=Limits(**LIMITS)))

    return build_once("serve-toy-vlm", build, "toy")


@pytest.fixture(scope="session")
def toy_pipe(toy_artifact):
    from btp.runtime import Pipeline

    return Pipeline.load(toy_artifact, threads=2)


@pytest.fixture(scope="session")
def scene_png() -> bytes:
    return resources.files("btp.tools").joinpath("data/toy-scene.png").read_bytes()


@pytest.fixture(scope="session")
def serve(toy_pipe):
    """Factory: a LiveServer over the toy pipeline with `ServeOptions(**kwargs)` (model name "toy"); all closed
    at the end of the session."""
    from btp.serve import Limits, ServeOptions, create_app

    servers = []

    def start(limits: dict | None = None, **kwargs) -> LiveServer:
        lim = Limits(**{"max_tokens": LIMITS["max_new_tokens"], **(limits or {})})
        server = LiveServer(create_app(toy_pipe, ServeOptions(model_name="toy", limits=lim, **kwargs)))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
