"""Every bad request of issue 21 item 3 gets its 4xx with an OpenAI error body ({"error": {message, type, param,
code}}), and the server answers a good request right after."""

import base64
import struct
import zlib

import pytest
from serving import ANSWER, chat, data_url, post

LIMITS = {"max_body_bytes": 64_000, "max_image_bytes": 20_000, "max_image_pixels": 1_000_000}


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG file whose header declares `width` x `height` pixels: what a decompression bomb looks like
    before it is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def server(serve):
    return serve(limits=LIMITS)


# name -> (body given the scene's data URL, status, code, param, words the message has)
CASES = {
    "malformed JSON": (lambda u: b'{"model": "toy", "messages": [', 400, "invalid_json", None, "not valid JSON"),
    "not an object": (lambda u: b"[1, 2]", 400, "invalid_json", None, "expected a JSON object"),
    "no image": (lambda u: chat(u, images=0), 400, "invalid_image_count", "messages", "found 0"),
    "two images": (lambda u: chat(u, images=2), 400, "invalid_image_count", "messages", "found 2"),
    "invalid base64": (lambda u: chat("data:image/png;base64,iVBO@@@=="), 400, "invalid_base64", "messages",
                       "invalid base64"),
    "not an image URL": (lambda u: chat("file:///etc/passwd"), 400, "invalid_image_url", "messages", "data:image"),
    "bytes that are not an image": (lambda u: chat(data_url(b"GIF89a but not really an image")), 400,
                                    "invalid_image", "messages", "not a readable image"),
    "over --max-image-bytes": (lambda u: chat(data_url(b"\0" * 30_000)), 413, "image_too_large", "messages",
                               "--max-image-bytes"),
    "over --max-image-pixels": (lambda u: chat(data_url(png_declaring(2000, 2000))), 400, "image_too_large",
                                "messages", "4000000 pixels"),
    "a decompression bomb": (lambda u: chat(data_url(png_declaring(100_000, 100_000))), 400, "image_too_large",
                             "messages", "decompression bomb"),
    "a prompt longer than the artifact allows": (lambda u: chat(u, text="What is there? " * 200), 400,
                                                 "invalid_prompt", "messages", "too long"),
    "max_tokens 0": (lambda u: chat(u, max_tokens=0), 400, "invalid_value", "max_tokens", "[1, 64]"),
    "max_tokens over the artifact's bound": (lambda u: chat(u, max_tokens=65), 400, "invalid_value", "max_tokens",
                                             "found 65"),
    "max_completion_tokens a string": (lambda u: chat(u, max_completion_tokens="8"), 400, "invalid_type",
                                       "max_completion_tokens", "expected int"),
    "temperature out of range": (lambda u: chat(u, temperature=3.5), 400, "invalid_value", "temperature", "3.5"),
    "an assistant turn": (lambda u: {**chat(u), "messages": [{"role": "assistant", "content": "Hi"}]}, 400,
                          "invalid_value", "messages[0].role", "'assistant'"),
    "an unknown model": (lambda u: chat(u, model="gpt-4o"), 404, "model_not_found", "model", "'gpt-4o'"),
    "a body over the size limit": (lambda u: chat(u, text="x" * 70_000), 413, "body_too_large", None,
                                   "--max-body-bytes"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_a_4xx_error_body_and_the_server_goes_on(server, scene_png, case):
    make, status, code, param, words = CASES[case]
    got, body = post(server, make(data_url(scene_png)))
    assert got == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == code and err["param"] == param
    assert words in err["message"] and "\n" not in err["message"], err["message"]
    ok, answer = post(server, chat(data_url(scene_png)))
    assert ok == 200 and answer["choices"][0]["message"]["content"] == ANSWER


def test_unknown_paths_and_methods_get_the_error_body(server):
    status, body = post(server, {}, path="/v1/completions")
    assert status == 404 and body["error"]["code"] == "not_found" and "/v1/completions" in body["error"]["message"]
    status, body = post(server, {}, path="/v1/models")
    assert status == 405 and body["error"]["type"] == "invalid_request_error"


def test_the_image_limit_is_the_decoded_size(server, scene_png):
    """A base64 image just under --max-image-bytes passes the encoded-length check and is decoded."""
    assert len(base64.b64encode(b"\0" * 19_999)) > LIMITS["max_image_bytes"]
    status, body = post(server, chat(data_url(b"\0" * 19_999)))
    assert status == 400 and body["error"]["code"] == "invalid_image"
