"""`btp-bench-serve ARTIFACT`: load on `btp-serve` from N concurrent streaming clients on loopback (the server a
child process, bounded in requests and time), against 1 client in the same run: requests/s, output tokens/s, time
to first token p50/p99, and the ratios N vs 1."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.client import HTTPConnection
from pathlib import Path

from btp.runtime.errors import InputError

SCENE = "the bundled toy scene"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, limit_s: float = 120.0) -> None:
    """Wait for `/health`; `InputError` with the server's last words if it exits first."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip().splitlines() if proc.stderr else []
            raise InputError(f"btp-serve exited with {proc.returncode}: {err[-1] if err else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise InputError(f"btp-serve did not answer /health within {limit_s:g} s")


def one_request(port: int, body: bytes) -> dict:
    """One streamed chat completion: time to the first content chunk, total time, output tokens (usage)."""
    conn = HTTPConnection("127.0.0.1", port, timeout=120)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {resp.read()[:200]!r}")
    ttft, tokens = None, 0
    for line in resp:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        doc = json.loads(line[6:])
        if ttft is None and doc["choices"] and doc["choices"][0]["delta"].get("content"):
            ttft = time.perf_counter() - t0
        if doc.get("usage"):
            tokens = doc["usage"]["completion_tokens"]
    conn.close()
    total = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else total, "total": total, "tokens": tokens}


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def load_run(port: int, body: bytes, clients: int, requests: int, duration: float) -> dict:
    """`clients` threads send `requests` requests in all (or until `duration` s) back to back."""
    results, lock, left = [], threading.Lock(), [requests]
    deadline = time.perf_counter() + duration

    def client():
        while time.perf_counter() < deadline:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            r = one_request(port, body)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r["ttft"] * 1e3 for r in results]
    return {"clients": clients, "requests": len(results), "seconds": round(wall, 3),
            "requests_per_s": round(len(results) / wall, 2),
            "output_tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
            "ttft_p50_ms": round(percentile(ttft, 50), 1), "ttft_p99_ms": round(percentile(ttft, 99), 1)}


def bench(args) -> dict:
    if args.image == SCENE:
        from importlib import resources

        raw = resources.files("btp.tools").joinpath("data/toy-scene.png").read_bytes()
    else:
        raw = Path(args.image).read_bytes()
    image = base64.b64encode(raw).decode()
    body = json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        {"type": "text", "text": args.prompt}]}], "max_tokens": args.max_new_tokens,
        "min_tokens": args.max_new_tokens, "stream": True, "stream_options": {"include_usage": True}}).encode()
    port = free_port()
    cmd = [sys.executable, "-m", "btp.cli.serve", args.artifact, "--port", str(port), "--threads", str(args.threads),
           "--batch-wait-ms", str(args.batch_wait_ms)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    try:
        wait_ready(port, proc)
        load_run(port, body, 1, 3, args.duration)  # warm-up
        runs = [load_run(port, body, n, args.requests, args.duration) for n in (1, args.clients)]
    finally:
        proc.terminate()
        proc.wait(30)
    one, many = runs
    ratios = {k: round(many[k] / one[k], 2) for k in ("requests_per_s", "output_tokens_per_s", "ttft_p50_ms")}
    return {"artifact": str(args.artifact), "max_new_tokens": args.max_new_tokens, "cpus": os.cpu_count(),
            "runs": runs, "ratios": ratios}
