"""btp-serve's HTTP app on a real uvicorn server, asked with the real `openai` client: answers equal btp-run's,
streamed or not; 8 concurrent clients get the answers they get alone, in shared batches; stop strings; models,
health and metrics; a client that leaves is dropped from its batch."""

import http.client
import json
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from serving import ANSWER, QUESTION, data_url

from btp.cli import run

# Questions of the toy task about the bundled scene; "Describe the scene." answers at length, so rows of one batch
# finish at different steps.
QUESTIONS = [QUESTION, "How many circles are there?", "What colour is the object at the top left?",
             "Describe the scene.", "Where is the gray square?", "How many white objects are there?",
             "What shape is the object at the bottom left?", "Where is each object?"]


@pytest.fixture(scope="module")
def server(serve):
    return serve(batch_wait_ms=20)


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def ask(server, question: str, png: bytes, **kwargs):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                             {"type": "text", "text": question}]}]
    return client(server).chat.completions.create(model="toy", messages=messages, **kwargs)


def metric(server, name: str) -> float:
    """The value of one unlabelled sample on /metrics."""
    text = urllib.request.urlopen(server.url + "/metrics").read().decode()
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def test_answers_equal_btp_run_streamed_or_not(server, toy_artifact, toy_pipe, scene_png, capsys):
    scene = str(toy_artifact.parent / "scene.png")
    with open(scene, "wb") as f:
        f.write(scene_png)
    assert run.main([str(toy_artifact), "--image", scene, "--prompt", QUESTION, "--max-new-tokens", "16"]) == 0
    expected = capsys.readouterr().out.strip()
    assert expected == ANSWER

    resp = ask(server, QUESTION, scene_png, max_tokens=16)
    assert resp.choices[0].message.content == expected and resp.choices[0].finish_reason == "stop"
    ref = toy_pipe.generate([toy_pipe_image(scene_png)], [QUESTION], max_new_tokens=16)
    assert resp.usage.prompt_tokens == len(ref.prompt_ids[0]) == 95
    assert resp.usage.completion_tokens == len(ref.token_ids[0]) == 3  # "bottom", "left", EOS
    ext = resp.model_extra["btp"]
    assert ext["kept_image_tokens"] == {"prune0": 20, "prune1": 13}
    assert ext["timings"]["ttft_ms"] > 0 and ext["timings"]["batch_size"] == 1

    stream = ask(server, QUESTION, scene_png, max_tokens=16, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == expected and len(pieces) == 2  # one delta a token
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].usage.prompt_tokens == 95


def toy_pipe_image(png: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB")


def test_eight_concurrent_clients_get_their_answers_alone_in_shared_batches(server, scene_png):
    alone = [ask(server, q, scene_png, max_tokens=32).choices[0].message.content for q in QUESTIONS]
    assert alone[0] == ANSWER and len(set(alone)) >= 6 and max(map(len, alone)) > 4 * len(ANSWER)
    batches_before = metric(server, "btp_batch_size_count")
    rows_before = metric(server, "btp_batch_size_sum")
    for stream in (False, True):
        def one(q, stream=stream):
            if not stream:
                return ask(server, q, scene_png, max_tokens=32).choices[0].message.content
            chunks = ask(server, q, scene_png, max_tokens=32, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(one, QUESTIONS)) == alone
    batches = metric(server, "btp_batch_size_count") - batches_before
    rows = metric(server, "btp_batch_size_sum") - rows_before
    assert rows == 16 and batches < 16  # rows shared batches


def test_stop_strings_end_the_answer_before_them(server, scene_png):
    resp = ask(server, QUESTION, scene_png, max_tokens=16, stop=[" left"])
    assert resp.choices[0].message.content == "bottom" and resp.choices[0].finish_reason == "stop"
    chunks = list(ask(server, QUESTION, scene_png, max_tokens=16, stop="left", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "bottom "
    short = ask(server, "Describe the scene.", scene_png, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


def test_models_health_and_metrics(server, scene_png):
    assert [m.id for m in client(server).models.list()] == ["toy"]
    assert json.loads(urllib.request.urlopen(server.url + "/health").read())["status"] == "ok"
    ask(server, QUESTION, scene_png, max_tokens=4)
    text = urllib.request.urlopen(server.url + "/metrics").read().decode()
    for name in ["btp_requests_total{status=\"200\"}", "btp_queue_depth", "btp_batch_size_bucket",
                 "btp_time_to_first_token_seconds_bucket", "btp_time_per_output_token_seconds_bucket",
                 "btp_image_tokens_kept_sum{stage=\"prune1\"}"]:
        assert name in text, name
    assert metric(server, 'btp_image_tokens_kept_count{stage="prune0"}') * 20 == \
        metric(server, 'btp_image_tokens_kept_sum{stage="prune0"}')


def test_a_client_that_leaves_is_dropped_from_its_batch(server, scene_png):
    dropped = metric(server, "btp_rows_dropped_total")
    tokens = metric(server, "btp_output_tokens_total")
    body = json.dumps({"model": "toy", "max_tokens": 64, "min_tokens": 64, "stream": True, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(scene_png)}},
                                     {"type": "text", "text": "Describe the scene."}]}]})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.sock.close()  # gone after the first chunk
    conn.close()
    deadline = time.monotonic() + 10
    while metric(server, "btp_rows_dropped_total") == dropped and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metric(server, "btp_rows_dropped_total") == dropped + 1
    assert metric(server, "btp_output_tokens_total") == tokens  # never answered
    assert ask(server, QUESTION, scene_png, max_tokens=8).choices[0].message.content == ANSWER


def test_remote_images_only_when_allowed(serve, scene_png):
    class Image(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(scene_png)

        def log_message(self, *args):
            pass

    host = ThreadingHTTPServer(("127.0.0.1", 0), Image)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{host.server_address[1]}/scene.png"
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": QUESTION}]}]
    try:
        allowed = serve(limits={"allow_remote_images": True})
        resp = client(allowed).chat.completions.create(model="toy", messages=messages, max_tokens=8)
        assert resp.choices[0].message.content == ANSWER
        refused = serve()
        with pytest.raises(openai.BadRequestError) as err:
            client(refused).chat.completions.create(model="toy", messages=messages, max_tokens=8)
        assert err.value.body["code"] == "remote_image_refused" and "--allow-remote-images" in err.value.message
    finally:
        host.shutdown()
