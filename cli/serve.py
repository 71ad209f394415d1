"""`btp-serve ARTIFACT`: an OpenAI-compatible HTTP server over a compiled artifact, batching requests across
clients; `--triton` serves it through NVIDIA PyTriton instead, `--export-triton REPO` writes a Triton model
repository; `--check-config` prints the configuration and exits."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from btp.cli.common import add_common, print_json, run_main, stdout_to_stderr
from btp.runtime.errors import InputError
from btp.serve.app import ServeOptions
from btp.serve.protocol import Limits


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="btp-serve", description=__doc__)
    p.add_argument("artifact", help="artifact directory written by btp-compile")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--model-name", help="the model name clients send (default: the artifact directory's name)")
    p.add_argument("--max-batch", type=int, help="rows per batch (default and at most: the artifact's max batch)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a first request waits for others "
                   "to share its batch (default: 5)")
    p.add_argument("--max-queue", type=int, default=64, help="queued requests past which the server answers 429")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may wait in the queue (503 past)")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="largest request body (413 past)")
    p.add_argument("--max-image-bytes", type=int, default=4 << 20, help="largest encoded image (413 past)")
    p.add_argument("--max-image-pixels", type=int, default=16_000_000, help="largest image, width x height")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (off: a server that "
                   "fetches any URL it is sent can be made to reach internal hosts)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = its choice)")
    p.add_argument("--backend", default="auto", help="auto, onnxruntime or tensorrt (as btp-run)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (as btp-run)")
    p.add_argument("--triton", action="store_true", help="serve through NVIDIA PyTriton (Triton's HTTP on --port, "
                   "gRPC on --port+1, metrics on --port+2) with Triton's dynamic batcher")
    p.add_argument("--export-triton", metavar="REPO", help="write a Triton model repository and exit")
    p.add_argument("--instances", type=int, default=1, help="Triton model instances (--export-triton)")
    p.add_argument("--check-config", action="store_true", help="load the artifact, print the configuration, exit")
    add_common(p, "print one JSON object: the configuration (--check-config), the export (--export-triton) or, "
               "once the server listens, its address")
    return p


def _options(args, pipe) -> ServeOptions:
    bound = pipe.spec.max_batch or 1
    max_batch = args.max_batch if args.max_batch is not None else bound
    if not 1 <= max_batch <= bound:
        raise InputError(f"--max-batch: expected 1..{bound} (the artifact's max batch), found {max_batch}")
    for name in ("max_queue", "timeout", "max_body_bytes", "max_image_bytes", "max_image_pixels"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')}: expected a positive value, found {getattr(args, name)}")
    if args.batch_wait_ms < 0:
        raise InputError(f"--batch-wait-ms: expected >= 0, found {args.batch_wait_ms}")
    limits = Limits(max_body_bytes=args.max_body_bytes, max_image_bytes=args.max_image_bytes,
                    max_image_pixels=args.max_image_pixels, max_tokens=pipe.manifest.build.max_new_tokens,
                    allow_remote_images=args.allow_remote_images)
    name = args.model_name or Path(args.artifact).resolve().name
    return ServeOptions(model_name=name, max_batch=max_batch, batch_wait_ms=args.batch_wait_ms,
                        max_queue=args.max_queue, timeout_s=args.timeout, limits=limits)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        if not 0 <= args.port <= 65535:
            raise InputError(f"--port: expected 0..65535, found {args.port}")
        if args.export_triton and Path(args.export_triton).exists() and not Path(args.export_triton).is_dir():
            raise InputError(f"--export-triton {args.export_triton}: expected a directory, found a file")
        from btp.runtime import Pipeline

        with stdout_to_stderr(args.json):
            pipe = Pipeline.load(args.artifact, backend=args.backend, device=args.device, threads=args.threads)
            options = _options(args, pipe)
        wait_us = int(options.batch_wait_ms * 1000)
        if args.export_triton:
            from btp.serve.triton import export_triton

            doc = export_triton(args.artifact, args.export_triton, options.model_name, options.max_batch, wait_us,
                                args.instances, args.threads)
            print_json(doc) if args.json else print(f"wrote {len(doc['files'])} files to {args.export_triton}")
            return 0
        info = {"model": options.model_name, "artifact": str(args.artifact), "max_batch": options.max_batch,
                "batch_wait_ms": options.batch_wait_ms, "max_queue": options.max_queue, "timeout_s": options.timeout_s,
                "max_tokens": options.limits.max_tokens, "triton": args.triton,
                "url": f"http://{args.host}:{args.port}" + ("" if args.triton else "/v1")}
        if args.check_config:
            print_json(info) if args.json else print("\n".join(f"{k}: {v}" for k, v in info.items()))
            return 0
        if args.triton:
            return _serve_triton(args, pipe, options, wait_us, info)
        return _serve_http(args, pipe, options, info)

    return run_main(body, args.debug, "btp-serve", options=vars(args))


def _serve_http(args, pipe, options: ServeOptions, info: dict) -> int:
    import contextlib
    import signal

    import uvicorn

    from btp.serve.app import create_app

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):  # say where it listens once it does
            await super().startup(sockets)
            print_json(info) if args.json else print(f"btp-serve: {options.model_name} at {info['url']}",
                                                      file=sys.stderr, flush=True)

        @contextlib.contextmanager
        def capture_signals(self):  # SIGTERM/SIGINT drain, then exit 0 (uvicorn would re-raise the signal)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self.handle_exit)
            yield

    config = uvicorn.Config(create_app(pipe, options), host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=options.timeout_s)
    Server(config).run()
    return 0


def _serve_triton(args, pipe, options: ServeOptions, wait_us: int, info: dict) -> int:
    import json
    import signal

    from btp.serve.triton import bind_pytriton, pytriton_server

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop

    out = sys.stdout
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:  # leaving the block stops Triton, which lets the inferences in flight finish (5 s at most)
        with stdout_to_stderr(), pytriton_server(args.host, args.port, args.port + 1, args.port + 2) as triton:
            bind_pytriton(triton, pipe, options.model_name, options.max_batch, wait_us, options.limits)
            triton.run()  # PyTriton prints Triton's log on stdout: it goes to stderr, stdout keeps the JSON
            print(json.dumps(info) if args.json else f"btp-serve: {options.model_name} on Triton at {info['url']}",
                  file=out if args.json else sys.stderr, flush=True)
            triton.serve()
    except Stop:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
