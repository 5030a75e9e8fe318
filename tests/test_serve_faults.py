"""The HTTP API under bad input and abuse, against a real uvicorn server in a thread (conftest's `client`): every
refusal is a one-line JSON error with the right status, bodies are capped while read, slow or vanishing clients and a
crashing predictor do not hang it."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from modelkit import UPPER
from servers import assert_error, raw_exchange, serve_in_thread

from couplet.serving import create_app
from couplet.serving.body_guard import MAX_BODY_BYTES, BodyGuard
from couplet.serving.schemas import TOP_K_MAX


def test_bad_lines_are_422_with_a_clear_message(client):
    max_len = client.get("/healthz").json()["max_len"]
    cases = [
        ({"upper": ""}, ["empty"]),
        ({"upper": "   "}, ["empty"]),
        ({"upper": "春" * (max_len + 1)}, [str(max_len + 1), str(max_len)]),
        ({"upper": "hello world"}, ["chinese"]),
        ({"upper": "春风123"}, ["chinese"]),
        ({"upper": "春风龘"}, ["vocabulary", "龘"]),
    ]
    for body, needles in cases:
        assert_error(client.post("/api/match", json=body), 422, *needles)


@pytest.mark.parametrize(
    "body, needles",
    [
        ({"upper": UPPER, "top_k": 0}, ["top_k", "1", str(TOP_K_MAX)]),
        ({"upper": UPPER, "top_k": TOP_K_MAX + 1}, ["top_k", str(TOP_K_MAX + 1)]),
        ({"upper": UPPER, "top_k": -5}, ["top_k"]),
        ({"upper": UPPER, "top_k": "3"}, ["top_k", "integer"]),
        ({"upper": UPPER, "top_k": 2.5}, ["top_k"]),
        ({"upper": UPPER, "top_k": True}, ["top_k"]),
        ({"upper": UPPER, "tone": "yes"}, ["tone", "boolean"]),
        ({"upper": 123}, ["upper", "string"]),
        ({"upper": None}, ["upper"]),
        ({"top_k": 3}, ["missing", "upper"]),
        ({"upper": UPPER, "uper": "x"}, ["unknown field", "uper"]),
        ({"uper": UPPER}, ["missing field 'upper'", "unknown field 'uper'"]),
    ],
)
def test_bad_fields_are_422(client, body, needles):
    assert_error(client.post("/api/match", json=body), 422, *needles)


@pytest.mark.parametrize("raw", [b"{", b'{"upper": "\xe6\x98\xa5"', b"nonsense", b'{"upper": "a",}'])
def test_malformed_json_is_400(client, raw):
    resp = client.post("/api/match", content=raw, headers={"content-type": "application/json"})
    assert_error(resp, 400, "json")


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"just a string"', b"42", b"null"])
def test_body_must_be_an_object(client, raw):
    assert_error(client.post("/api/match", content=raw, headers={"content-type": "application/json"}), 422, "json object")


def test_empty_body(client):
    assert_error(client.post("/api/match", headers={"content-type": "application/json"}), 422, "empty")


def test_invalid_utf8_is_a_400(client):
    resp = client.post("/api/match", content=b'{"upper": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert_error(resp, 400, "parsing the body")


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None])
def test_wrong_content_type_is_415(client, ctype):
    headers = {"content-type": ctype} if ctype else {}
    req = client.build_request("POST", "/api/match", content=json.dumps({"upper": UPPER}).encode(), headers=headers)
    if ctype is None:
        req.headers.pop("content-type", None)
    assert_error(client.send(req), 415, "content type", "application/json")


def test_oversized_body_is_413(client):
    body = json.dumps({"upper": "春" * MAX_BODY_BYTES}, ensure_ascii=False).encode()
    assert len(body) > MAX_BODY_BYTES
    assert_error(client.post("/api/match", content=body, headers={"content-type": "application/json"}), 413, "too large")


def test_oversized_declared_length_refused_before_reading(base_url, body_reads):
    """A huge Content-Length is answered 413 at once, without waiting for (or reading) the body."""
    head = (
        "POST /api/match HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000000000\r\n\r\n"
    ).encode() + b'{"upper": "'
    t0 = time.monotonic()
    reply = raw_exchange(base_url, head, read_timeout=5)
    assert time.monotonic() - t0 < 3
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"error"' in reply
    assert body_reads.only("/api/match") == []  # not one body message was pulled from the server


def test_streamed_body_is_capped(client, body_reads):
    """Chunked bodies have no Content-Length: the cap applies while reading, and reading stops there."""

    def chunks():
        yield b'{"upper": "'
        for _ in range(64):  # 64 KiB, 4x the cap
            yield b"x" * 1024
        yield b'"}'

    resp = client.post("/api/match", content=chunks(), headers={"content-type": "application/json"})
    assert_error(resp, 413, "too large")
    # uvicorn hands over whatever has arrived in one message, so the split varies; what the server read
    # does not: everything before the last message it pulled fitted under the cap, the last one crossed it.
    reads = body_reads.only("/api/match")
    assert reads and sum(reads[:-1]) <= MAX_BODY_BYTES < sum(reads), reads
    assert sum(reads) <= 11 + 64 * 1024 + 2


def test_body_guard_stops_pulling_at_the_cap():
    """The guard alone, message by message: it pulls exactly up to the message that crosses the cap."""
    import asyncio

    messages = [b'{"upper": "'] + [b"x" * 1024] * 64 + [b'"}']
    pulled: list[int] = []
    sent: list[dict] = []
    reached_app = []

    async def receive():
        body = messages[len(pulled)]
        pulled.append(len(body))
        return {"type": "http.request", "body": body, "more_body": len(pulled) < len(messages)}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        reached_app.append(scope)

    scope = {"type": "http", "method": "POST", "path": "/api/match", "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")]}
    asyncio.run(BodyGuard(app)(scope, receive, send))
    assert len(pulled) == 1 + MAX_BODY_BYTES // 1024  # the opening 11 bytes, then 16 KiB-chunks: the 16th crosses
    assert sum(pulled) == 11 + MAX_BODY_BYTES and sum(pulled[:-1]) <= MAX_BODY_BYTES
    assert not reached_app
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"]) == {"error": f"request body too large: over {MAX_BODY_BYTES} bytes"}


def test_chunked_small_body_is_fine(client):
    def chunks():
        data = json.dumps({"upper": UPPER}, ensure_ascii=False).encode()
        yield data[:5]
        yield data[5:]

    resp = client.post("/api/match", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 200, resp.text


def test_body_that_never_arrives_is_408(unbatched_url):
    head = b"POST /api/match HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    t0 = time.monotonic()
    reply = raw_exchange(unbatched_url, head, read_timeout=5)
    assert time.monotonic() - t0 < 4
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]


def test_unknown_route_and_method(client):
    assert_error(client.get("/nope"), 404, "/nope")
    assert_error(client.get("/api/match"), 405, "GET")
    assert_error(client.put("/api/match", json={"upper": UPPER}), 405, "PUT")


def test_clients_that_hang_up_do_not_hurt(base_url, client):
    host, port = base_url.split("://")[1].split(":")
    body = json.dumps({"upper": UPPER, "top_k": 3}, ensure_ascii=False).encode()
    request = (
        f"POST /api/match HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    for _ in range(20):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(request)  # and hang up without reading the answer
    assert client.post("/api/match", json={"upper": UPPER}).status_code == 200


def test_predictor_crash_is_a_json_500_not_a_hang(tiny_predictor):
    class Broken:
        model_id, max_len = "broken", 34

        def match_batch(self, *args, **kwargs):
            raise RuntimeError("boom")

        def match(self, *args, **kwargs):
            raise RuntimeError("boom")

    for batching in (True, False):
        with serve_in_thread(create_app(Broken(), batching=batching)) as url:
            resp = httpx.post(url + "/api/match", json={"upper": UPPER}, timeout=10)
            assert_error(resp, 500, "internal error")
            assert httpx.get(url + "/healthz").json()["model"] == "broken"


@pytest.mark.parametrize(
    "body, needles",
    [
        # pins (issue 18): each refusal names the pin
        ({"upper": UPPER, "pins": {"7": "云"}}, ["pin 7=云", "out of range", "0 to 6"]),
        ({"upper": UPPER, "pins": {"99": "云"}}, ["pin 99", "out of range"]),
        ({"upper": UPPER, "pins": {"0": "，"}}, ["pin 0=，", "punctuation"]),
        ({"upper": "春风，得意", "pins": {"2": "云"}}, ["pin 2=云", "punctuation"]),
        ({"upper": UPPER, "pins": {"0": "龘"}}, ["pin 0=龘", "vocabulary"]),
        ({"upper": UPPER, "pins": {"0": "云雨"}}, ["pin 0=云雨", "one character"]),
        ({"upper": UPPER, "pins": {"0": ""}}, ["pin 0=", "one character"]),
        ({"upper": UPPER, "pins": {"-1": "云"}}, ["pins", "'-1'", "not a position"]),
        ({"upper": UPPER, "pins": {"first": "云"}}, ["pins", "'first'", "not a position"]),
        ({"upper": UPPER, "pins": {"0": "云", "00": "雨"}}, ["pins", "both pin position 0"]),
        ({"upper": UPPER, "pins": {"0": 5}}, ["pins.0", "string"]),
        ({"upper": UPPER, "pins": ["云"]}, ["pins", "dictionary"]),
        ({"upper": "山山水水", "pins": {"0": "云", "1": "雨"}}, ["repetition"]),
        # 藏头
        ({"upper": UPPER, "head": "云雨"}, ["head", "one character"]),
        ({"upper": UPPER, "head": "云", "pins": {"0": "雨"}}, ["head 云", "position 0"]),
        ({"upper": UPPER, "head": 1}, ["head", "string"]),
        # alternatives
        ({"upper": UPPER, "alternatives": 21}, ["alternatives", "0 and 20", "21"]),
        ({"upper": UPPER, "alternatives": -1}, ["alternatives", "-1"]),
        ({"upper": UPPER, "alternatives": "3"}, ["alternatives", "integer"]),
        ({"upper": UPPER, "alternatives": 1.5}, ["alternatives"]),
        # direction
        ({"upper": UPPER, "direction": "left"}, ["direction", "'down' or 'up'", "left"]),
        ({"upper": UPPER, "direction": None}, ["direction"]),
        ({"upper": UPPER, "pins": {"0": "云"}, "dir": "up"}, ["unknown field 'dir'", "direction", "pins", "alternatives"]),
        # a blocked word in the given line (the shipped default list; decode.block_input is on)
        ({"upper": "你这傻逼"}, ["blocked word", "傻逼", "block_input"]),
        ({"upper": "你这傻逼", "direction": "up", "pins": {"0": "云"}}, ["blocked word"]),
    ],
)
def test_bad_studio_fields_are_422(client, unbatched_url, body, needles):
    assert_error(client.post("/api/match", json=body), 422, *needles)
    assert_error(httpx.post(unbatched_url + "/api/match", json=body, timeout=10), 422, *needles)


def test_server_still_healthy_after_abuse(client):
    assert client.get("/healthz").status_code == 200
    assert client.post("/api/match", json={"upper": UPPER}).status_code == 200


def test_a_blocked_pin_is_a_422(tmp_path):
    from modelkit import save_tiny_model

    from couplet.predictor import Predictor

    words = tmp_path / "words.txt"
    words.write_text("云\n", encoding="utf-8")
    predictor = Predictor.load(save_tiny_model(tmp_path / "m"), num_threads=1, blocklist=words)
    with serve_in_thread(create_app(predictor)) as url:
        assert_error(httpx.post(url + "/api/match", json={"upper": UPPER, "pins": {"0": "云"}}, timeout=10), 422, "pin 0=云", "blocklist")
