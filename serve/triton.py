"""The same pipeline as a Triton Inference Server model: served in-process through NVIDIA PyTriton
(`btp-serve ARTIFACT --triton`), or exported as a model repository for a stock Triton server or KServe
(`btp-serve ARTIFACT --export-triton REPO`: a Python-backend `model.py` that loads the artifact, and a
`config.pbtxt` with dynamic batching and an instance group).

The model's I/O, per row (Triton adds the batch dim): inputs `image` BYTES `[1]` (an encoded image file),
`prompt` BYTES `[1]` (UTF-8), `max_tokens` INT32 `[1]`; outputs `text` BYTES `[1]`, `completion_tokens`
INT32 `[1]`."""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import numpy as np

from btp.runtime.errors import BtpError, InputError
from btp.runtime.pipeline import Pipeline

from .protocol import Limits, decode_image

INPUTS = [("image", "TYPE_STRING"), ("prompt", "TYPE_STRING"), ("max_tokens", "TYPE_INT32")]
OUTPUTS = [("text", "TYPE_STRING"), ("completion_tokens", "TYPE_INT32")]
MODEL_FILE = Path(__file__).with_name("triton_model.py")


def _rows(request: dict[str, np.ndarray], limits: Limits):
    """The (image, prompt, max_tokens) rows of one request's arrays `[b,1]`; `InputError` for a bad row."""
    images, prompts, limit = (np.asarray(request[name]).reshape(-1) for name, _ in INPUTS)
    if not len(images) == len(prompts) == len(limit):
        raise InputError(f"expected as many prompts and max_tokens as images, found {len(images)} images, "
                         f"{len(prompts)} prompts, {len(limit)} max_tokens")
    rows = []
    for i, (image, prompt, m) in enumerate(zip(images, prompts, limit)):
        if not 1 <= int(m) <= limits.max_tokens:
            raise InputError(f"row {i}: max_tokens: expected a value in [1, {limits.max_tokens}], found {int(m)}")
        try:
            text = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
        except UnicodeDecodeError as err:
            raise InputError(f"row {i}: prompt: expected UTF-8 text") from err
        rows.append((decode_image(bytes(image), limits, f"row {i}: image"), text, int(m)))
    return rows


def answer_requests(pipe: Pipeline, requests: list[dict[str, np.ndarray]], limits: Limits) -> list:
    """Answer Triton requests (name -> array `[b,1]`) in batches of the artifact's max batch: per request, its
    outputs (`text` object `[b,1]`, `completion_tokens` int32 `[b,1]`) or the `BtpError` of its first bad row."""
    answers: list = []
    rows, owners = [], []
    for k, request in enumerate(requests):
        try:
            mine = _rows(request, limits)
        except BtpError as err:
            answers.append(err)
            continue
        answers.append(None)
        rows += mine
        owners += [k] * len(mine)
    texts, counts = [], []
    step = pipe.spec.max_batch or len(rows) or 1
    eos = set(pipe.spec.eos_token_ids)
    tok = pipe.processor.tokenizer
    for s in range(0, len(rows), step):
        chunk = rows[s:s + step]
        try:
            out = pipe.generate([r[0] for r in chunk], [r[1] for r in chunk], max_new_tokens=max(r[2] for r in chunk))
        except BtpError as err:  # a prompt the artifact cannot take: every request of this chunk gets it
            for k in set(owners[s:s + step]):
                answers[k] = err
            texts += [""] * len(chunk)
            counts += [0] * len(chunk)
            continue
        for ids, (_, _, m) in zip(out.token_ids, chunk):
            ids = ids[:m]
            texts.append(tok.decode([t for t in ids if t not in eos], skip_special_tokens=True).lstrip())
            counts.append(len(ids))
    for k in range(len(requests)):
        if answers[k] is None:
            mine = [i for i, o in enumerate(owners) if o == k]
            answers[k] = {"text": np.array([[texts[i].encode()] for i in mine], dtype=object),
                          "completion_tokens": np.array([[counts[i]] for i in mine], dtype=np.int32)}
    return answers


def triton_environment() -> None:
    """Let Triton's Python stub find this interpreter's libpython: without the interpreter's LIBDIR on
    LD_LIBRARY_PATH it loads the system's (or none) and fails (seen on CPU-only Debian)."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    paths = os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
    if libdir and libdir not in paths:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *[p for p in paths if p]])


def bind_pytriton(triton, pipe: Pipeline, name: str, max_batch: int, wait_us: int, limits: Limits) -> None:
    """Bind the pipeline to a started-or-not `pytriton.triton.Triton` as model `name` with dynamic batching."""
    from pytriton.exceptions import PyTritonBadParameterError
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    def infer(requests):
        answers = answer_requests(pipe, [dict(r.items()) for r in requests], limits)
        bad = [str(a) for a in answers if isinstance(a, BtpError)]
        if bad:  # PyTriton answers a call as a whole: its requests fail together, with the first reason
            raise PyTritonBadParameterError(bad[0])
        return answers

    inputs = [Tensor(name="image", dtype=bytes, shape=(1,)), Tensor(name="prompt", dtype=bytes, shape=(1,)),
              Tensor(name="max_tokens", dtype=np.int32, shape=(1,))]
    outputs = [Tensor(name="text", dtype=bytes, shape=(1,)), Tensor(name="completion_tokens", dtype=np.int32,
                                                                      shape=(1,))]
    config = ModelConfig(max_batch_size=max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=wait_us))
    triton.bind(model_name=name, infer_func=infer, inputs=inputs, outputs=outputs, config=config, strict=True)


def pytriton_server(host: str, http_port: int, grpc_port: int, metrics_port: int):
    """A `pytriton.triton.Triton` listening on `host` (HTTP, gRPC and metrics ports), not yet running."""
    triton_environment()
    from pytriton.triton import Triton, TritonConfig

    return Triton(config=TritonConfig(http_address=host, http_port=http_port, grpc_address=host,
                                      grpc_port=grpc_port, metrics_address=host, metrics_port=metrics_port,
                                      exit_timeout_secs=5))


def model_config(name: str, max_batch: int, wait_us: int, instances: int, threads: int) -> str:
    """The `config.pbtxt` of the exported model."""
    def tensors(kind, specs):
        body = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ 1 ] }}' for n, t in specs)
        return f"{kind} [\n{body}\n]\n"

    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n' + tensors("input", INPUTS)
            + tensors("output", OUTPUTS)
            + f"dynamic_batching {{ max_queue_delay_microseconds: {wait_us} }}\n"
            + f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n"
            + 'parameters { key: "artifact" value: { string_value: "artifact" } }\n'
            + f'parameters {{ key: "threads" value: {{ string_value: "{threads}" }} }}\n')


def export_triton(artifact, repo, name: str, max_batch: int, wait_us: int = 5000, instances: int = 1,
                  threads: int = 0) -> dict:
    """Write a Triton model repository `repo/name/{config.pbtxt, 1/model.py, 1/artifact/}` (the artifact copied
    in, so the repository is whole on any machine with btp installed); returns what was written."""
    if not name.replace("-", "").replace("_", "").isalnum():
        raise InputError(f"--model-name: expected letters, digits, - and _, found {name!r}")
    model_dir = Path(repo) / name
    if model_dir.exists():
        raise InputError(f"--export-triton {repo}: expected no model {name!r} there yet, found {model_dir}")
    version = model_dir / "1"
    version.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(model_config(name, max_batch, wait_us, instances, threads))
    shutil.copyfile(MODEL_FILE, version / "model.py")
    shutil.copytree(artifact, version / "artifact", symlinks=True)
    files = sorted(str(p.relative_to(repo)) for p in Path(repo).rglob("*") if p.is_file() and "artifact" not in
                   p.relative_to(model_dir).parts[1:2])
    return {"repository": str(repo), "model": name, "files": files, "max_batch_size": max_batch,
            "instances": instances}
