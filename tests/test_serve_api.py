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
from couplet.serving.schemas import ALTERNATIVES_MAX, TOP_K_MAX, MatchResponse, match_payload


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
    assert {"upper", "candidates", "constraints", "model", "direction", "alternatives"} <= set(schemas["MatchResponse"]["properties"])
    # the studio fields (issue 18), each with an example
    props = schemas["MatchRequest"]["properties"]
    assert {"direction", "pins", "head", "alternatives"} <= set(props)
    for name in ("direction", "pins", "head", "alternatives"):
        assert props[name].get("examples") and props[name].get("description"), name
    assert props["alternatives"]["minimum"] == 0 and props["alternatives"]["maximum"] == ALTERNATIVES_MAX
    assert set(props["direction"]["enum"]) == {"down", "up"}
    examples = schemas["MatchRequest"]["examples"]
    assert any("pins" in e for e in examples) and any(e.get("direction") == "up" for e in examples)
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
    from couplet.predictor import Alternative, Candidate, MatchResult

    result = MatchResult("春风", [Candidate("秋月", -1.5), Candidate("秋雨", float("-inf"))], ["no_copy"], "m", relaxed=["tone"])
    assert match_payload(result) == {
        "upper": "春风",
        "candidates": [{"lower": "秋月", "score": -1.5}, {"lower": "秋雨", "score": None}],
        "constraints": ["no_copy"],
        "relaxed": ["tone"],
        "model": "m",
        "direction": "down",
        "alternatives": [],
    }
    with_alternatives = MatchResult("春风", [Candidate("秋月", -1.5)], [], "m", alternatives=[[Alternative("夏", -2.0)], [Alternative("日", float("-inf"))]], direction="up")
    payload = match_payload(with_alternatives)
    assert payload["direction"] == "up"
    assert payload["alternatives"] == [[{"char": "夏", "score": -2.0}], [{"char": "日", "score": None}]]
    assert MatchResponse.model_validate(payload).model_dump() == payload


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


# --------------------------------------------------------------------- the studio fields (issue 18)


def _is_couplet(given: str, answer: str) -> bool:
    """Same length, no character copied in place (punctuation is copied: it must be)."""
    from couplet.data.punct import is_punct

    return len(answer) == len(given) and all(a != b or is_punct(a) for a, b in zip(given, answer))


def test_alternatives_limit_matches_the_decoder():
    from couplet.decoding.studio import MAX_ALTERNATIVES

    assert ALTERNATIVES_MAX == MAX_ALTERNATIVES


def test_plain_answer_has_direction_and_no_alternatives(client):
    body = client.post("/api/match", json={"upper": UPPER}).json()
    assert body["direction"] == "down" and body["alternatives"] == []


def test_pins_and_head_force_characters(client, tiny_predictor):
    plain = client.post("/api/match", json={"upper": UPPER}).json()["candidates"][0]["lower"]
    pick = next(ch for ch in "海天山水花草云雨" if ch != plain[0] and ch not in UPPER)
    body = client.post("/api/match", json={"upper": UPPER, "pins": {"0": pick}, "top_k": 3}).json()
    assert all(c["lower"][0] == pick and _is_couplet(UPPER, c["lower"]) for c in body["candidates"]), body
    assert body["candidates"][0]["lower"] == tiny_predictor.match(UPPER, pins={0: pick}).best
    # 藏头: head is pins {"0": ...}; it combines with pins elsewhere
    head = client.post("/api/match", json={"upper": UPPER, "head": pick}).json()
    assert head["candidates"][0]["lower"] == body["candidates"][0]["lower"]
    both = client.post("/api/match", json={"upper": UPPER, "head": pick, "pins": {"0": pick, "3": "云"}}).json()
    lower = both["candidates"][0]["lower"]
    assert lower[0] == pick and lower[3] == "云" and _is_couplet(UPPER, lower)


def test_a_pin_that_a_rule_forbids_makes_the_rule_give_way(client):
    body = client.post("/api/match", json={"upper": UPPER, "pins": {"0": UPPER[0]}}).json()  # a copy in place
    assert body["candidates"][0]["lower"][0] == UPPER[0]
    assert "no_copy" in body["relaxed"]


def test_alternatives_per_position_each_valid_when_pinned(client):
    body = client.post("/api/match", json={"upper": UPPER, "alternatives": 3}).json()
    best = body["candidates"][0]["lower"]
    alts = body["alternatives"]
    assert len(alts) == len(best)
    for i, position in enumerate(alts):
        assert 1 <= len(position) <= 3
        assert all(set(a) == {"char", "score"} and len(a["char"]) == 1 and a["char"] != best[i] for a in position)
        assert all(isinstance(a["score"], float) for a in position)
        assert [a["score"] for a in position] == sorted((a["score"] for a in position), reverse=True)
    # pinning an alternative re-answers with it there, still a couplet
    i, char = 2, alts[2][0]["char"]
    again = client.post("/api/match", json={"upper": UPPER, "pins": {str(i): char}}).json()
    lower = again["candidates"][0]["lower"]
    assert lower[i] == char and _is_couplet(UPPER, lower)
    assert again["candidates"][0]["score"] == pytest.approx(alts[2][0]["score"], abs=1e-3)


def test_alternatives_skip_punctuation(client):
    line = "春风得意，马蹄疾"
    body = client.post("/api/match", json={"upper": line, "alternatives": 2}).json()
    assert body["candidates"][0]["lower"][4] == "，"
    assert body["alternatives"][4] == [] and all(body["alternatives"][i] for i in (0, 1, 2, 3, 5, 6, 7))


def test_reverse_direction_answers_upper_lines(client, tiny_predictor):
    """The tiny model has two directions (model.directions=2, the default): untrained, but the wiring shows."""
    assert tiny_predictor.model.cfg.directions == 2
    body = client.post("/api/match", json={"upper": UPPER, "direction": "up", "top_k": 2, "alternatives": 1}).json()
    assert body["direction"] == "up" and body["upper"] == UPPER
    assert all(_is_couplet(UPPER, c["lower"]) for c in body["candidates"])
    assert [c["lower"] for c in body["candidates"]] == [c.lower for c in tiny_predictor.match(UPPER, top_k=2, direction="up").candidates]
    assert len(body["alternatives"]) == len(UPPER)


def test_one_direction_model_refuses_up(tmp_path):
    from modelkit import TINY, save_tiny_model
    from servers import serve_in_thread

    from couplet.predictor import Predictor
    from couplet.serving import create_app

    folder = save_tiny_model(tmp_path / "one-way", Config(model=TINY.model_copy(update={"directions": 1})))
    predictor = Predictor.load(folder, num_threads=1)
    for batching in (True, False):
        with serve_in_thread(create_app(predictor, batching=batching)) as url, httpx.Client(base_url=url, timeout=10) as c:
            assert_error(c.post("/api/match", json={"upper": UPPER, "direction": "up"}), 422, "only upper")
            assert_error(c.post("/api/match", json={"upper": UPPER, "direction": "up", "alternatives": 2}), 422, "only upper")
            assert c.post("/api/match", json={"upper": UPPER}).json()["direction"] == "down"


def test_batched_and_studio_requests_together(base_url, tiny_predictor):
    """Plain requests (batched) and requests with pins, alternatives or the other direction, all at once: each
    caller gets its own answer, equal to `predictor.match` with the same fields."""
    jobs = []
    for line in ("春风得意马蹄疾", "海阔凭鱼跃", "天高任鸟飞", "山水"):
        jobs += [
            (line, {}),
            (line, {"direction": "up"}),
            (line, {"pins": {"0": "云" if line[0] != "云" else "雨"}}),
            (line, {"alternatives": 2}),
            (line, {"head": "红", "alternatives": 1, "direction": "up"}),
        ]
    jobs *= 2

    def as_kwargs(fields):
        kw = {"direction": fields.get("direction", "down"), "alternatives": fields.get("alternatives", 0)}
        pins = {int(k): v for k, v in fields.get("pins", {}).items()}
        if "head" in fields:
            pins[0] = fields["head"]
        return {**kw, "pins": pins}

    with httpx.Client(base_url=base_url, timeout=20, limits=httpx.Limits(max_connections=12)) as c:
        with ThreadPoolExecutor(max_workers=12) as pool:
            answers = list(pool.map(lambda job: c.post("/api/match", json={"upper": job[0], **job[1]}), jobs))
    for (line, fields), resp in zip(jobs, answers):
        assert resp.status_code == 200, resp.text
        body = resp.json()
        expected = tiny_predictor.match(line, **as_kwargs(fields))
        assert body["upper"] == line and body["direction"] == expected.direction
        assert [c["lower"] for c in body["candidates"]] == [c.lower for c in expected.candidates]
        assert [[a["char"] for a in p] for p in body["alternatives"]] == [[a.char for a in p] for p in expected.alternatives]


def test_unbatched_variant_takes_the_studio_fields(unbatched_url):
    with httpx.Client(base_url=unbatched_url, timeout=10) as c:
        body = c.post("/api/match", json={"upper": UPPER, "pins": {"1": "云"}, "alternatives": 2, "direction": "up"}).json()
        assert body["candidates"][0]["lower"][1] == "云" and body["direction"] == "up" and len(body["alternatives"]) == len(UPPER)
        assert_error(c.post("/api/match", json={"upper": UPPER, "pins": {"9": "云"}}), 422, "pin 9", "range")


def test_blocklist_of_the_server(tmp_path):
    """A served predictor's blocklist (`couplet serve --blocklist`): no answer holds a blocked word, a line with one is a 422."""
    from modelkit import save_tiny_model
    from servers import serve_in_thread

    from couplet.predictor import Predictor
    from couplet.serving import create_app

    folder = save_tiny_model(tmp_path / "m")
    plain = Predictor.load(folder, num_threads=1).match(UPPER).best
    words = tmp_path / "words.txt"
    words.write_text(f"# mine\n{plain[:2]}\n水花\n", encoding="utf-8")
    predictor = Predictor.load(folder, num_threads=1, blocklist=words)
    with serve_in_thread(create_app(predictor)) as url, httpx.Client(base_url=url, timeout=10) as c:
        body = c.post("/api/match", json={"upper": UPPER, "top_k": 5, "alternatives": 3}).json()
        assert body["candidates"] and all(plain[:2] not in cand["lower"] for cand in body["candidates"])
        assert_error(c.post("/api/match", json={"upper": "山水花草"}), 422, "blocked word", "水花")
        assert c.get("/healthz").status_code == 200
