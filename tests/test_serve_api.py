"""The HTTP API's answers, against a real uvicorn server in a thread (conftest's `client`) with a tiny random model:
health, /api/match, its options, concurrency, the OpenAPI spec, the one serialiser, the web page."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from modelkit import UPPER
from servers import assert_error

from couplet.core.config import Config
from couplet.serving.schemas import TOP_K_MAX, MatchResponse, match_payload


def test_healthz(client, tiny_model_dir):
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok", "model": tiny_model_dir.name, "max_len": Config().data.max_len}


def test_match_answers_with_candidates(client, tiny_model_dir):
    resp = client.post("/api/match", json={"upper": UPPER, "top_k": 3, "tone": False})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["upper"] == UPPER
    assert body["model"] == tiny_model_dir.name
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


def test_concurrent_requests_each_get_their_own_answer(base_url, tiny_predictor):
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
        expected = tiny_predictor.match(line, top_k=k, tone=tone)
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


def test_one_serialiser_for_the_api_and_the_cli(client, tiny_predictor, tiny_model_dir):
    """POST /api/match and `couplet match --json` answer with `match_payload`, which is a MatchResponse."""
    from typer.testing import CliRunner

    import couplet.cli.model  # noqa: F401  (registers match)
    from couplet.cli import app

    result = tiny_predictor.match(UPPER, top_k=3)
    payload = match_payload(result)
    assert list(payload) == list(MatchResponse.model_fields)
    assert MatchResponse.model_validate(payload).model_dump() == payload
    body = client.post("/api/match", json={"upper": UPPER, "top_k": 3}).json()
    assert list(body) == list(payload)
    assert MatchResponse.model_validate(body).model_dump() == body
    import torch

    threads = torch.get_num_threads()  # `couplet match` sets torch's (process-wide) thread count
    try:
        r = CliRunner().invoke(app, ["match", UPPER, "--model", str(tiny_model_dir), "--top-k", "3", "--json"])
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
