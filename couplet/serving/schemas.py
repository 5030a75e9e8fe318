"""What goes over the wire: the request and answer schemas, and `match_payload`, the one serialiser of
a `MatchResult` (used by `POST /api/match` and by `couplet match --json`)."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

TOP_K_MAX = 10
ALTERNATIVES_MAX = 20  # couplet.decoding.studio.MAX_ALTERNATIVES (not imported: `couplet match --json` needs only this module)
EXAMPLE_UPPER = "春风得意马蹄疾"
_POSITION = re.compile(r"[0-9]{1,4}")


class MatchRequest(BaseModel):
    """An upper line to answer (or, with direction "up", a lower line to answer with upper lines)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"upper": EXAMPLE_UPPER, "top_k": 3, "tone": False},
                {"upper": EXAMPLE_UPPER, "pins": {"0": "秋"}, "alternatives": 5},
                {"upper": EXAMPLE_UPPER, "head": "福"},
                {"upper": "秋月扬明辉海阔", "direction": "up"},
            ]
        },
    )

    upper: StrictStr = Field(description="The given line: the upper line (上联), or with direction \"up\" the lower line (下联). Chinese characters, at most the model's max_len.")
    top_k: StrictInt = Field(1, ge=1, le=TOP_K_MAX, description=f"How many candidates to return (1..{TOP_K_MAX}).")
    tone: StrictBool = Field(False, description="Also enforce the final-tone rule: the lower line ends in a level (平) tone (with direction \"up\": the upper line ends in an oblique (仄) tone).")
    constrained: StrictBool = Field(True, description="Enforce punctuation, repetition structure, no copying in place and (unless the model folder turns it off) no reuse of the given line's characters.")
    direction: Literal["down", "up"] = Field("down", description="\"down\": `upper` is an upper line, the candidates are lower lines; \"up\": `upper` holds a lower line and the candidates are upper lines (a model trained with model.directions=2).", examples=["down", "up"])
    pins: dict[StrictStr, StrictStr] = Field(default_factory=dict, description="Characters the answer must have at given positions: position (a string of digits, from 0) -> one character. A pin is never dropped; a rule it forbids gives way and is named in `relaxed`. An impossible pin (out of range, at punctuation, punctuation, outside the vocabulary, against the repetition structure, blocked) is a 422.", examples=[{"0": "秋"}, {"0": "福", "6": "春"}])
    head: StrictStr | None = Field(None, description="藏头: the answer's first character; the same as pins {\"0\": head}.", examples=["福"])
    alternatives: StrictInt = Field(0, ge=0, le=ALTERNATIVES_MAX, description=f"For each position of the best candidate, up to this many other characters that keep the whole line valid with the rest unchanged (0..{ALTERNATIVES_MAX}; 0: none).", examples=[5])

    @field_validator("pins")
    @classmethod
    def _pin_positions(cls, pins: dict[str, str]) -> dict[str, str]:
        seen: dict[int, str] = {}
        for key in pins:
            if not _POSITION.fullmatch(key):
                raise ValueError(f"pins: {key!r} is not a position (a number from 0, as a string: {{\"0\": \"福\"}})")
            position = int(key)
            if position in seen:
                raise ValueError(f"pins: {seen[position]!r} and {key!r} both pin position {position}")
            seen[position] = key
        return pins

    @model_validator(mode="after")
    def _head_is_pin_zero(self) -> "MatchRequest":
        if self.head is not None:
            if len(self.head) != 1:
                raise ValueError(f"head: one character (got {json.dumps(self.head, ensure_ascii=False)})")
            other = self.pin_map().get(0)
            if other is not None and other != self.head:
                raise ValueError(f"head {self.head} and pins {{\"0\": \"{other}\"}} both pin position 0")
        return self

    def pin_map(self) -> dict[int, str]:
        """The pins by position, `head` as position 0 (`Predictor.match`'s `pins`)."""
        pins = {int(key): ch for key, ch in self.pins.items()}
        if self.head is not None:
            pins.setdefault(0, self.head)
        return pins

    @property
    def plain(self) -> bool:
        """No pins and no alternatives: a request `Predictor.match_batch` can answer in a batch."""
        return not self.pins and self.head is None and not self.alternatives


class CandidateOut(BaseModel):
    lower: str = Field(description="A lower line (下联), as long as the upper line.")
    score: float | None = Field(description="The model's score for this lower line (higher is better); null when ruled out.")


class AlternativeOut(BaseModel):
    char: str = Field(description="Another character for this position.")
    score: float | None = Field(description="The score of the best candidate with this character there (the rest unchanged).")


class MatchResponse(BaseModel):
    upper: str = Field(description="The given line as answered (whitespace removed).")
    candidates: list[CandidateOut] = Field(description="Best first. With direction \"up\" each `lower` is an upper line.")
    constraints: list[str] = Field(description="The decoding constraints that were applied.")
    relaxed: list[str] = Field(default_factory=list, description="Requested constraints dropped because no line satisfied them, or because a pin forbade them.")
    model: str = Field(description="Id of the model that answered.")
    direction: Literal["down", "up"] = Field("down", description="As requested: \"down\" answers an upper line, \"up\" a lower line.")
    alternatives: list[list[AlternativeOut]] = Field(
        default_factory=list,
        description="When asked (`alternatives` > 0): per position of the best candidate, other characters, best first ([] at punctuation); else [].",
        examples=[[[{"char": "秋", "score": -9.8}, {"char": "夏", "score": -10.2}], []]],
    )


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
        "direction": getattr(result, "direction", "down"),
        "alternatives": [
            [{"char": a.char, "score": _finite(a.score)} for a in position] for position in (getattr(result, "alternatives", None) or [])
        ],
    }


def match_json(result) -> bytes:
    """`match_payload(result)` as compact UTF-8 JSON: the body of a 200 from `POST /api/match`."""
    return json.dumps(match_payload(result), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
