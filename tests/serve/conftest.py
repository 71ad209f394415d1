"""What the serving tests share: one compiled builtin:toy-vlm (the demo's plan, max batch 8) per session, its
Pipeline, and real uvicorn servers on loopback ports running in this process."""

import base64
import threading
import time
from importlib import resources

import pytest

# The bounds the server tests need: 8 rows a batch, the toy prompt (95 tokens) with room, 64-token answers.
LIMITS = dict(max_batch=8, max_prompt=160, max_new_tokens=64)
QUESTION, ANSWER = "Where is the white circle?", "bottom left"


@pytest.fixture(scope="session")
def toy_artifact(tmp_path_factory):
    """builtin:toy-vlm compiled with the demo's plan (20 then 13 of 81 image tokens kept)."""
    from btp.compiler.build import BuildConfig, compile_artifact
    from btp.compiler.export import Limits
    from btp.tools.samples import toy_plan_path

    out = tmp_path_factory.mktemp("serve") / "toy"
    compile_artifact(BuildConfig(model="builtin:toy-vlm", plan=str(toy_plan_path()), out=out, backend="onnxruntime",
                                 limits=Limits(**LIMITS)))
    return out


@pytest.fixture(scope="session")
def toy_pipe(toy_artifact):
    from btp.runtime import Pipeline

    return Pipeline.load(toy_artifact, threads=2)


@pytest.fixture(scope="session")
def scene_png() -> bytes:
    return resources.files("btp.tools").joinpath("data/toy-scene.png").read_bytes()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


class LiveServer:
    """A real uvicorn server for `app` on a free loopback port, in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


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
