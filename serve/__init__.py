"""Serving a compiled artifact: an OpenAI-compatible HTTP server with batching across requests (`create_app`,
`btp-serve`), the same pipeline as a Triton Inference Server model (`btp.serve.triton`), and a load benchmark
(`btp-bench-serve`). Needs the `serve` extra (Starlette, uvicorn, prometheus-client, nvidia-pytriton)."""

from .app import ServeOptions, create_app
from .protocol import Limits

__all__ = ["Limits", "ServeOptions", "create_app"]
