"""The batcher: single rows collated into one left-padded batch answer as they do alone; a full queue gets 429 and a
request that waits past --timeout gets 503, while the worker thread is busy; the server goes on after both."""

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from serving import ANSWER, QUESTION, chat, data_url, post

from btp.serve.batcher import collate


def test_collated_rows_answer_as_they_do_alone(toy_pipe):
    from btp.tools.samples import toy_scene

    questions = [QUESTION, "Describe the scene.", "How many circles are there?"]
    rows = [toy_pipe.prepare([toy_scene()], [q]) for q in questions]
    assert len({r.input_ids.shape[1] for r in rows}) > 1  # the rows need padding
    batch = collate(rows, toy_pipe.spec.pad_token_id)
    together = toy_pipe.prepare([toy_scene()] * 3, questions)  # the processor's own left padding
    for name in ("input_ids", "attention_mask", "pixel_values", "image_start"):
        assert torch.equal(getattr(batch, name), getattr(together, name)), name
    alone = [toy_pipe.generate([toy_scene()], [q], max_new_tokens=24).token_ids[0] for q in questions]
    steps = toy_pipe.steps(batch, 24, compact=True)
    got: list[list[int]] = [[] for _ in questions]
    eos = set(toy_pipe.spec.eos_token_ids)
    for step in steps:
        for r, t in zip(step.rows.tolist(), step.token.tolist()):
            if not got[r] or got[r][-1] not in eos:
                got[r].append(t)
    assert got == alone and toy_pipe.processor.tokenizer.decode(got[0], skip_special_tokens=True).strip() == ANSWER



def test_collated_qwen_rows_answer_as_they_do_alone(tiny_qwen):
    from PIL import Image

    from btp.compiler import reference_pipeline
    from btp.serve.batcher import same_image_size

    pipe = reference_pipeline(tiny_qwen, "none")
    image = Image.linear_gradient("L").resize((224, 224)).convert("RGB")  # 8x8 = 64 image tokens
    questions = ["What is shown?", "Describe the colours and the shapes of everything you see here.", "Hi"]
    rows = [pipe.prepare([image], [q]) for q in questions]
    assert len({r.input_ids.shape[1] for r in rows}) > 1  # the rows need padding
    fewer = pipe.prepare([image.resize((112, 112))], ["Hi"])  # 16 image tokens
    wide = pipe.prepare([image.resize((448, 112))], ["Hi"])  # 64 image tokens too, on a 4x16 grid
    assert all(same_image_size(rows[0], r) for r in rows)
    assert not same_image_size(rows[0], fewer) and not same_image_size(rows[0], wide)
    with pytest.raises(ValueError, match="one image size"):
        collate(rows + [wide], pipe.spec.pad_token_id)
    batch = collate(rows, pipe.spec.pad_token_id)
    together = pipe.prepare([image] * 3, questions)  # the processor's own left padding
    for name in ("input_ids", "attention_mask", "pixel_values", "image_start", "position_ids"):
        assert torch.equal(getattr(batch, name), getattr(together, name)), name
    assert batch.image_tokens == together.image_tokens == 64 and batch.vision.keys() == together.vision.keys()
    assert all(torch.equal(batch.vision[k], v) for k, v in together.vision.items())
    alone = [pipe.generate([image], [q], max_new_tokens=8).token_ids[0] for q in questions]
    got: list[list[int]] = [[] for _ in questions]
    eos = set(pipe.spec.eos_token_ids)
    for step in pipe.steps(batch, 8, compact=True):
        for r, t in zip(step.rows.tolist(), step.token.tolist()):
            if not got[r] or got[r][-1] not in eos:
                got[r].append(t)
    assert got == alone


def _health(server) -> dict:
    return json.loads(urllib.request.urlopen(server.url + "/health").read())


def _until(server, key: str, value: int, limit_s: float = 10.0):
    """Wait until /health reports `key` (queued, running) at `value`."""
    deadline = time.monotonic() + limit_s
    while _health(server)[key] != value:
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_a_full_queue_gets_429_and_a_long_wait_503(serve, scene_png):
    for timeout_s, want in [(30.0, 429), (0.3, 503)]:
        server = serve(max_batch=1, max_queue=1, batch_wait_ms=0, timeout_s=timeout_s)
        busy = threading.Event()
        server.app.state.batcher._worker.submit(busy.wait)  # the worker thread is busy with something else
        good = chat(data_url(scene_png))
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, server, good)  # taken from the queue, waits for the worker
            _until(server, "running", 1)
            if want == 429:
                second = pool.submit(post, server, good)  # waits in the queue
                _until(server, "queued", 1)
                status, body = post(server, good)
                assert status == 429 and body["error"]["code"] == "queue_full" and "--max-queue 1" in \
                    body["error"]["message"]
                busy.set()
                assert [f.result()[0] for f in (first, second)] == [200, 200]
            else:
                status, body = first.result()
                assert status == 503 and body["error"]["code"] == "timeout" and body["error"]["type"] == \
                    "server_error" and "--timeout" in body["error"]["message"]
                busy.set()
        status, body = post(server, good)
        assert status == 200 and body["choices"][0]["message"]["content"] == ANSWER
