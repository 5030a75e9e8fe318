"""The HTTP API against a real uvicorn server on a free 127.0.0.1 port, with a tiny random model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from couplet.core.config import Config, ModelConfig
from couplet.modelling.model import CoupletLabeller, save_labeller
from couplet.predictor import Predictor
from couplet.serving import create_app
from couplet.serving.body_guard import MAX_BODY_BYTES, BodyGuard
from couplet.serving.schemas import TOP_K_MAX, MatchResponse, match_payload
from couplet.data.vocab import Vocab
from procs import descendants as _descendants
from servers import serve_in_thread

ROOT = Path(__file__).resolve().parents[1]
CHARS = "春风得意马蹄疾秋月扬明辉海阔凭鱼跃天高任鸟飞山水花草云雨红绿日夜，。"
UPPER = "春风得意马蹄疾"


def make_tiny_model(model_dir: Path) -> Path:
    import torch

    torch.manual_seed(0)
    vocab = Vocab.from_counts(Counter({ch: 3 for ch in CHARS}), min_count=1)
    config = Config(model=ModelConfig(embed_dim=16, n_blocks=2, kernel_size=3, dropout=0.0))
    model = CoupletLabeller(len(vocab), config.model).eval()
    save_labeller(model, vocab, config, model_dir)
    return model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("serve") / "tiny-model")


@pytest.fixture(scope="module")
def predictor(model_dir):
    """One torch thread, as `couplet serve` runs (two threads spin badly on a busy 2-core box); restored after."""
    import torch

    before = torch.get_num_threads()
    yield Predictor.load(model_dir, num_threads=1)
    torch.set_num_threads(before)


class BodyReads:
    """ASGI wrapper that records, per request, the size of every body message the app pulled from the server."""

    def __init__(self, app):
        self.app = app
        self.requests: list[tuple[str, list[int]]] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        reads: list[int] = []
        self.requests.append((scope["path"], reads))

        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                reads.append(len(message.get("body", b"")))
            return message

        await self.app(scope, counted, send)

    def only(self, path: str) -> list[int]:
        """The body reads of the one request to `path` since the last `clear()`."""
        found = [reads for p, reads in self.requests if p == path]
        assert len(found) == 1, self.requests
        return found[0]

    def clear(self) -> None:
        self.requests.clear()


@pytest.fixture(scope="module")
def served(predictor):
    """The default app behind a `BodyReads` recorder, under a real server: (base URL, recorder)."""
    recorder = BodyReads(create_app(predictor))
    with serve_in_thread(recorder) as url:
        yield url, recorder


@pytest.fixture(scope="module")
def base_url(served):
    return served[0]


@pytest.fixture
def body_reads(served):
    recorder = served[1]
    recorder.clear()
    return recorder


@pytest.fixture(scope="module")
def unbatched_url(predictor):
    """The threadpool variant, with a short body timeout to test 408 quickly."""
    with serve_in_thread(create_app(predictor, batching=False, body_timeout_s=0.5)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=10) as c:
        yield c


def assert_error(resp: httpx.Response, status: int, *needles: str) -> str:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    message = body["error"]
    assert isinstance(message, str) and message and "\n" not in message
    for needle in needles:
        assert needle.lower() in message.lower(), message
    return message


def raw_exchange(url: str, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes, return whatever comes back before the server closes or the timeout."""
    host, port = url.split("://")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b'"}' in chunks[-1]:
                    break
        except socket.timeout:
            pass
    return b"".join(chunks)


# --------------------------------------------------------------------------------------------- happy paths


def test_healthz(client, model_dir):
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok", "model": model_dir.name, "max_len": Config().data.max_len}


def test_match_answers_with_candidates(client, model_dir):
    resp = client.post("/api/match", json={"upper": UPPER, "top_k": 3, "tone": False})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["upper"] == UPPER
    assert body["model"] == model_dir.name
    assert isinstance(body["constraints"], list) and body["constraints"]
    cands = body["candidates"]
    assert 1 <= len(cands) <= 3
    for c in cands:
        assert set(c) == {"lower", "score"}
        assert len(c["lower"]) == len(UPPER)
        assert isinstance(c["score"], float)
    scores = [c["score"] for c in cands]
    assert scores == sorted(scores, reverse=True)


def test_match_defaults_and_options(client):
    resp = client.post("/api/match", json={"upper": "海阔凭鱼跃"})
    assert resp.status_code == 200
    assert len(resp.json()["candidates"]) == 1
    resp = client.post("/api/match", json={"upper": "海阔凭鱼跃", "top_k": 2, "tone": True, "constrained": False})
    assert resp.status_code == 200
    assert all(len(c["lower"]) == 5 for c in resp.json()["candidates"])


def test_json_content_type_with_charset_is_fine(client):
    data = json.dumps({"upper": UPPER}, ensure_ascii=False).encode()
    resp = client.post("/api/match", content=data, headers={"content-type": "application/json; charset=utf-8"})
    assert resp.status_code == 200


def test_concurrent_requests_each_get_their_own_answer(base_url, predictor):
    """Batched requests of mixed lengths and options come back to the right callers, equal to one-off answers."""
    lines = ["春风得意马蹄疾", "海阔凭鱼跃", "天高任鸟飞", "秋月扬明辉", "山水", "红日", "花草云雨红绿"]
    jobs = [(line, k, tone) for line in lines for k in (1, 3) for tone in (False, True)] * 2

    with httpx.Client(base_url=base_url, timeout=10, limits=httpx.Limits(max_connections=12)) as c:

        def ask(job):
            line, k, tone = job
            return job, c.post("/api/match", json={"upper": line, "top_k": k, "tone": tone})

        with ThreadPoolExecutor(max_workers=12) as pool:
            answers = list(pool.map(ask, jobs))
    for (line, k, tone), resp in answers:
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["upper"] == line
        expected = predictor.match(line, top_k=k, tone=tone)
        assert [c["lower"] for c in body["candidates"]] == [c.lower for c in expected.candidates]
        for got, want in zip(body["candidates"], expected.candidates):
            assert got["score"] == pytest.approx(want.score, abs=1e-3)


def test_unbatched_variant_answers_too(unbatched_url):
    with httpx.Client(base_url=unbatched_url, timeout=10) as c:
        resp = c.post("/api/match", json={"upper": UPPER, "top_k": 2})
        assert resp.status_code == 200
        assert len(resp.json()["candidates"][0]["lower"]) == len(UPPER)
        assert_error(c.post("/api/match", json={"upper": "hello"}), 422, "chinese")


def test_openapi(client):
    resp = client.get("/openapi.json")
    assert resp.status_code == 200
    spec = resp.json()
    op = spec["paths"]["/api/match"]["post"]
    assert "requestBody" in op and "422" in op["responses"] and "413" in op["responses"]
    schemas = spec["components"]["schemas"]
    assert {"upper", "top_k", "tone"} <= set(schemas["MatchRequest"]["properties"])
    assert schemas["MatchRequest"]["properties"]["top_k"]["maximum"] == TOP_K_MAX
    assert {"upper", "candidates", "constraints", "model"} <= set(schemas["MatchResponse"]["properties"])
    assert "/healthz" in spec["paths"]
    # the 200 is documented as what is sent: a MatchResponse
    answer = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer == {"$ref": "#/components/schemas/MatchResponse"}


def test_one_serialiser_for_the_api_and_the_cli(client, predictor, model_dir):
    """POST /api/match and `couplet match --json` answer with `match_payload`, which is a MatchResponse."""
    from typer.testing import CliRunner

    import couplet.cli.model  # noqa: F401  (registers match)
    from couplet.cli import app

    result = predictor.match(UPPER, top_k=3)
    payload = match_payload(result)
    assert list(payload) == list(MatchResponse.model_fields)
    assert MatchResponse.model_validate(payload).model_dump() == payload
    body = client.post("/api/match", json={"upper": UPPER, "top_k": 3}).json()
    assert list(body) == list(payload)
    assert MatchResponse.model_validate(body).model_dump() == body
    import torch

    threads = torch.get_num_threads()  # `couplet match` sets torch's (process-wide) thread count
    try:
        r = CliRunner().invoke(app, ["match", UPPER, "--model", str(model_dir), "--top-k", "3", "--json"])
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    cli = json.loads(r.stdout)
    assert list(cli) == list(payload) and cli["relaxed"] == payload["relaxed"] == body["relaxed"]
    for answer in (body, cli):
        assert [c["lower"] for c in answer["candidates"]] == [c["lower"] for c in payload["candidates"]]
        assert [c["score"] for c in answer["candidates"]] == pytest.approx([c["score"] for c in payload["candidates"]], abs=1e-3)


def test_scores_that_are_not_finite_are_null():
    from couplet.predictor import Candidate, MatchResult

    result = MatchResult("春风", [Candidate("秋月", -1.5), Candidate("秋雨", float("-inf"))], ["no_copy"], "m", relaxed=["tone"])
    assert match_payload(result) == {
        "upper": "春风",
        "candidates": [{"lower": "秋月", "score": -1.5}, {"lower": "秋雨", "score": None}],
        "constraints": ["no_copy"],
        "relaxed": ["tone"],
        "model": "m",
    }


def test_web_page_is_self_contained(client):
    resp = client.get("/")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    html = resp.text
    assert "/api/match" in html and "writing-mode: vertical-rl" in html
    assert 'id="upper"' in html and 'id="match"' in html and 'id="candidates"' in html
    # offline: nothing fetched from another host
    for attr in ('src="http', "src='http", 'href="http', "href='http", "@import", "url(http"):
        assert attr not in html


# ------------------------------------------------------------------------------------------- bad input


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


def test_predictor_crash_is_a_json_500_not_a_hang(predictor):
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


def test_server_still_healthy_after_abuse(client):
    assert client.get("/healthz").status_code == 200
    assert client.post("/api/match", json={"upper": UPPER}).status_code == 200


# ---------------------------------------------------------------------------------------- the command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLI = [sys.executable, "-c", "import sys; from couplet.cli import main; sys.exit(main())"]


def test_default_workers_follow_the_usable_cores(monkeypatch):
    """One worker per core the process may use (its affinity mask), capped; threads share out the rest."""
    from couplet.cli import serve as serve_cli

    cap = serve_cli.MAX_DEFAULT_WORKERS
    assert [serve_cli.default_workers(n) for n in (1, 2, 3, cap, cap + 1, 64)] == [1, 2, 3, cap, cap, cap]
    # --workers 1 keeps one torch thread whatever the machine; N workers never ask for more threads than cores
    assert [serve_cli.default_threads(1, n) for n in (1, 2, 16)] == [1, 1, 1]
    assert [serve_cli.default_threads(w, n) for w, n in ((2, 2), (3, 2), (8, 16), (8, 20), (4, 64))] == [1, 1, 2, 2, 16]
    for workers, cores in ((2, 2), (8, 16), (8, 20), (5, 64), (16, 4)):
        assert workers * serve_cli.default_threads(workers, cores) <= max(cores, workers)

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)  # 2 of the machine's cores
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert serve_cli.usable_cores() == 2 and serve_cli.default_workers() == 2
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    assert serve_cli.usable_cores() == 64 and serve_cli.default_workers() == cap
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert serve_cli.usable_cores() == 1


@pytest.mark.parametrize("cores, args, workers, threads", [
    (4, [], 4, 1),                      # the default: one process per usable core
    (16, [], 8, 2),                     # capped, the spare cores become torch threads
    (4, ["--workers", "1"], 1, 1),      # in this process, as before
    (4, ["--workers", "3", "--threads", "2"], 3, 2),
])
def test_cli_serve_default_worker_count(model_dir, monkeypatch, cores, args, workers, threads):
    """What `couplet serve` hands uvicorn, without starting a server (uvicorn.run is replaced)."""
    import torch
    import uvicorn
    from typer.testing import CliRunner

    from couplet.cli import COMMAND_MODULES, app
    from couplet.cli import serve as serve_cli

    for name in COMMAND_MODULES:
        __import__(name)
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda target, **kw: calls.append((target, kw)))
    monkeypatch.setattr(serve_cli, "usable_cores", lambda: cores)
    for name in ("COUPLET_SERVE_MODEL", "COUPLET_SERVE_DEVICE", "COUPLET_SERVE_BATCHING", "COUPLET_SERVE_THREADS", "COUPLET_SERVE_BALANCE"):
        monkeypatch.setenv(name, "unset")  # restored (removed) after the test, whatever serve writes
    before = torch.get_num_threads()
    try:
        r = CliRunner().invoke(app, ["serve", "--model", str(model_dir), "--port", str(_free_port()), *args])
    finally:
        torch.set_num_threads(before)
    assert r.exit_code == 0, r.output
    assert f"with {workers} worker{'s' if workers > 1 else ''} ({threads} torch thread" in r.stderr, r.stderr
    (target, kw), = calls
    if workers == 1:
        assert not isinstance(target, str) and "workers" not in kw  # the app itself: one process, model loaded here
    else:
        assert target == "couplet.serving.app:app_from_env" and kw["factory"] and kw["workers"] == workers
        assert os.environ["COUPLET_SERVE_MODEL"] == str(model_dir)
        assert os.environ["COUPLET_SERVE_THREADS"] == str(threads)
        assert os.environ["COUPLET_SERVE_BATCHING"] == "1"
        assert os.environ["COUPLET_SERVE_BALANCE"].endswith("slots")  # the workers' shared slot file (removed by now)


@pytest.mark.parametrize("workers, stop", [(1, signal.SIGINT), (2, signal.SIGTERM)])
def test_cli_serve_loads_once_and_binds_loopback(model_dir, tmp_path, workers, stop):
    port = _free_port()
    env = {**os.environ, "COUPLET_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", str(port), "--model", str(model_dir), "--workers", str(workers)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                resp = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)
        assert resp.json()["model"] == model_dir.name
        resp = httpx.post(f"http://127.0.0.1:{port}/api/match", json={"upper": UPPER, "top_k": 2}, timeout=10)
        assert resp.status_code == 200 and len(resp.json()["candidates"]) >= 1
        with ThreadPoolExecutor(max_workers=8) as pool:  # concurrent requests, spread over the workers
            answers = list(pool.map(lambda _: httpx.post(f"http://127.0.0.1:{port}/api/match", json={"upper": UPPER}, timeout=10), range(16)))
        assert {a.status_code for a in answers} == {200}
        assert len({a.json()["candidates"][0]["lower"] for a in answers}) == 1  # every worker loaded the same model
        started = _descendants(proc.pid)
        assert len(started) >= workers - 1, started  # uvicorn's worker processes (the supervisor is `proc`)
    finally:
        os.kill(proc.pid, stop)  # the parent only, as systemd or a container runtime would
        _, err = proc.communicate(timeout=20)
    assert f"127.0.0.1:{port}/ with {workers} worker" in err, err
    assert proc.returncode == 128 + stop, err
    assert err.strip().splitlines()[-1] == f"interrupted: {signal.Signals(stop).name}; the server stopped", err
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in started if Path(f"/proc/{pid}").exists()], "a server worker outlived couplet serve"


def test_cli_serve_errors_are_one_line(tmp_path, model_dir):
    env = {**os.environ, "COUPLET_HOME": str(tmp_path)}
    r = subprocess.run([*CLI, "serve", "--model", str(tmp_path / "missing")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "missing" in r.stderr

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([*CLI, "serve", "--port", str(port), "--model", str(model_dir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and str(port) in r.stderr, r.stderr
