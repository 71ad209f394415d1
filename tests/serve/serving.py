"""Helpers of the serving tests (a module of its own: `conftest` names two modules in this suite)."""

import base64
import json
import threading
import time
import urllib.error
import urllib.request

# The bounds the server tests need: 8 rows a batch, the toy prompt (95 tokens) with room, 64-token answers.
LIMITS = dict(max_batch=8, max_prompt=160, max_new_tokens=64)
QUESTION, ANSWER = "Where is the white circle?", "bottom left"


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


def chat(url: str = "", text: str = QUESTION, images: int = 1, **fields) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}}] * images + [{"type": "text", "text": text}]
    return {"model": "toy", "messages": [{"role": "user", "content": parts}], "max_tokens": 8, **fields}


def post(server, body, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=raw, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
