"""The OpenAI chat-completions request as btp takes it: one image (an `image_url` content part), text parts,
sampling options, each field checked with a one-line `RequestError` naming it; and the error body."""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass, field

from btp.runtime.errors import BtpError, RequestError


@dataclass(frozen=True)
class Limits:
    """What the server accepts: body and image bytes, image pixels, answer length, images from the network."""

    max_body_bytes: int = 8 << 20
    max_image_bytes: int = 4 << 20
    max_image_pixels: int = 16_000_000
    max_tokens: int = 64  # the artifact's bound (btp-compile --max-new-tokens)
    allow_remote_images: bool = False


@dataclass
class ChatRequest:
    """One parsed request: the prompt text and the encoded image (not yet decoded), and how to answer."""

    model: str
    prompt: str
    image_url: str
    max_tokens: int
    stream: bool = False
    include_usage: bool = False
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)

    @property
    def batch_key(self) -> tuple:
        """Requests with the same key can share a batch: the sampling options apply to the whole batch."""
        greedy = self.temperature == 0
        return (greedy, None if greedy else (self.temperature, self.top_p, self.seed), self.min_tokens)


def error_body(err: BtpError) -> dict:
    """The OpenAI error object for `err`: `{"error": {"message", "type", "param", "code"}}`."""
    status = getattr(err, "status", 400)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": str(err), "type": kind, "param": getattr(err, "param", None),
                      "code": getattr(err, "code", None)}}


def _get(body: dict, name: str, kind, default, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise RequestError(f"{name}: expected {kind.__name__}, found {type(value).__name__}", param=name,
                           code="invalid_type")
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(f"{name}: expected a value in [{low}, {high}], found {value}", param=name,
                           code="invalid_value")
    return value


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body; `RequestError` for bytes that are not one."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(f"the body is not valid JSON: {err}", code="invalid_json") from err
    if not isinstance(body, dict):
        raise RequestError(f"expected a JSON object, found {type(body).__name__}", code="invalid_json")
    return body


def parse_chat(body: dict, limits: Limits) -> ChatRequest:
    """A `ChatRequest` from a chat-completions body; `RequestError` for the first field that is wrong."""
    model = _get(body, "model", str, "")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: expected a non-empty list", param="messages", code="invalid_value")
    texts, images = [], []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user"):
            role = msg.get("role") if isinstance(msg, dict) else type(msg).__name__
            raise RequestError(f"{where}: expected a system or user message (one turn), found {role!r}",
                               param=f"{where}.role", code="invalid_value")
        content = msg.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise RequestError(f"{where}.content: expected a string or a list of parts", param=f"{where}.content",
                               code="invalid_type")
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                images.append(part["image_url"].get("url"))
            else:
                raise RequestError(f"{where}.content[{j}]: expected a text or image_url part, found {kind!r}",
                                   param=f"{where}.content", code="invalid_value")
    if len(images) != 1:
        raise RequestError(f"messages: expected exactly one image_url part, found {len(images)}",
                           param="messages", code="invalid_image_count")
    if not isinstance(images[0], str):
        raise RequestError("image_url.url: expected a string", param="messages", code="invalid_image_url")
    max_tokens = _get(body, "max_completion_tokens", int, None, 1, limits.max_tokens)
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", int, min(16, limits.max_tokens), 1, limits.max_tokens)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop: expected a string or a list of at most 4 non-empty strings", param="stop",
                           code="invalid_value")
    options = body.get("stream_options") or {}
    return ChatRequest(
        model=model, prompt="\n".join(texts), image_url=images[0], max_tokens=max_tokens,
        stream=_get(body, "stream", bool, False), include_usage=bool(options.get("include_usage", False)),
        temperature=_get(body, "temperature", float, 0.0, 0.0, 2.0), top_p=_get(body, "top_p", float, 1.0, 1e-6, 1.0),
        seed=_get(body, "seed", int, 0, 0, 2**63 - 1), min_tokens=_get(body, "min_tokens", int, 0, 0, max_tokens),
        stop=stop)


def fetch_remote(url: str, limit: int) -> bytes:
    """The bytes at an http(s) `url`, at most `limit` (refused past it); for `--allow-remote-images` only."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - the operator allowed remote images
            data = resp.read(limit + 1)
    except OSError as err:
        raise RequestError(f"image_url: cannot fetch {url}: {err}", param="messages", code="image_fetch_failed") \
            from err
    if len(data) > limit:
        raise RequestError(f"image_url: more than {limit} bytes at {url}", status=413, param="messages",
                           code="image_too_large")
    return data


def image_bytes(url: str, limits: Limits) -> bytes:
    """The encoded image of an `image_url`: a base64 `data:` URL, or (with `allow_remote_images`) an http(s) URL."""
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise RequestError("image_url: remote images are refused (the server was not started with "
                               "btp-serve --allow-remote-images); send a data:image/...;base64 URL", param="messages",
                               code="remote_image_refused")
        return fetch_remote(url, limits.max_image_bytes)
    head, sep, data = url.partition(",")
    if not (url.startswith("data:") and sep and head.endswith(";base64")):
        raise RequestError(f"image_url: expected a data:image/...;base64,... URL, found {url[:40]!r}",
                           param="messages", code="invalid_image_url")
    if len(data) > limits.max_image_bytes * 4 // 3 + 4:
        raise RequestError(f"image_url: the image is over {limits.max_image_bytes} bytes (btp-serve --max-image-bytes)",
                           status=413, param="messages", code="image_too_large")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(f"image_url: invalid base64 ({err})", param="messages", code="invalid_base64") from err
    if len(raw) > limits.max_image_bytes:
        raise RequestError(f"image_url: the image is {len(raw)} bytes, over {limits.max_image_bytes} "
                           "(btp-serve --max-image-bytes)", status=413, param="messages", code="image_too_large")
    return raw


class _Named(io.BytesIO):
    """Image bytes that name themselves in `open_image`'s messages."""

    def __init__(self, raw: bytes, name: str):
        super().__init__(raw)
        self._label = name

    def __str__(self) -> str:
        return self._label


def decode_image(raw: bytes, limits: Limits, what: str = "image_url"):
    """An RGB PIL image from encoded bytes, its size checked from the header (`max_image_pixels`) before
    decoding; `RequestError` (naming the field `what`) for bytes that are not an image or one too large."""
    from PIL import Image, UnidentifiedImageError

    from btp.runtime.inputs import open_image

    try:
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
    except Image.DecompressionBombError as err:
        raise RequestError(f"{what}: refused as a decompression bomb ({str(err).splitlines()[0][:120]})",
                           param="messages", code="image_too_large") from err
    except (UnidentifiedImageError, OSError) as err:
        raise RequestError(f"{what}: not a readable image ({type(err).__name__})", param="messages",
                           code="invalid_image") from err
    if w * h > limits.max_image_pixels:
        raise RequestError(f"{what}: {w}x{h} is {w * h} pixels, over the {limits.max_image_pixels} accepted "
                           "(btp-serve --max-image-pixels)", param="messages", code="image_too_large")
    try:
        return open_image(_Named(raw, what))
    except BtpError as err:
        raise RequestError(str(err), param="messages", code="invalid_image") from err
