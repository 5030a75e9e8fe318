"""What goes over the wire: the request and answer schemas, and `match_payload`, the one serialiser of
a `MatchResult` (used by `POST /api/match` and by `couplet match --json`)."""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

TOP_K_MAX = 10
EXAMPLE_UPPER = "春风得意马蹄疾"


class MatchRequest(BaseModel):
    """An upper line to answer."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"upper": EXAMPLE_UPPER, "top_k": 3, "tone": False}]})

    upper: StrictStr = Field(description="The upper line (上联): Chinese characters, at most the model's max_len.")
    top_k: StrictInt = Field(1, ge=1, le=TOP_K_MAX, description=f"How many lower-line candidates to return (1..{TOP_K_MAX}).")
    tone: StrictBool = Field(False, description="Also require the lower line to end in a level (平) tone.")
    constrained: StrictBool = Field(True, description="Enforce punctuation, repetition structure, no copying in place and (unless the model folder turns it off) no reuse of the upper line's characters.")


class CandidateOut(BaseModel):
    lower: str = Field(description="A lower line (下联), as long as the upper line.")
    score: float | None = Field(description="The model's score for this lower line (higher is better); null when ruled out.")


class MatchResponse(BaseModel):
    upper: str
    candidates: list[CandidateOut] = Field(description="Best first.")
    constraints: list[str] = Field(description="The decoding constraints that were applied.")
    relaxed: list[str] = Field(default_factory=list, description="Requested constraints dropped because no lower line satisfied them.")
    model: str = Field(description="Id of the model that answered.")


class HealthResponse(BaseModel):
    status: str
    model: str
    max_len: int | None = None


class ErrorResponse(BaseModel):
    error: str = Field(description="One line saying what was wrong.")


def _finite(x: Any) -> float | None:
    value = float(x)
    return value if math.isfinite(value) else None  # JSON has no -inf; a null score means "ruled out"


def match_payload(result) -> dict:
    """A `couplet.predictor.MatchResult` as a `MatchResponse`-shaped dict, ready for `json.dumps`
    (scores that are not finite become null). The API and `couplet match --json` both answer with it."""
    return {
        "upper": result.upper,
        "candidates": [{"lower": c.lower, "score": _finite(c.score)} for c in result.candidates],
        "constraints": list(result.constraints),
        "relaxed": list(getattr(result, "relaxed", None) or []),
        "model": result.model_id,
    }


def match_json(result) -> bytes:
    """`match_payload(result)` as compact UTF-8 JSON: the body of a 200 from `POST /api/match`."""
    return json.dumps(match_payload(result), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
