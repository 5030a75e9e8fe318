"""What a writer asks beyond the couplet rules: pinned characters, a blocklist, alternatives per position.

    options, given_way = check_pins(upper, {0: "福"}, vocab, options)   # RequestError for an impossible pin
    answer = search(...)                                                 # couplet.decoding.settings: pins are masks
    alternatives(upper, lp, vocab, settings, options, answer_line, 5)   # per position: [(char, line score), ...]

**Pins** force characters at positions. They are never relaxed. A pin is refused (RequestError, one line naming it)
when its position is outside the line or punctuation, its character is punctuation or outside the vocabulary,
when two pins fall on one position, or when pins break the repetition structure (two positions with the same upper
character pinned to different characters, or two with different upper characters pinned to the same one). A
pin a rule forbids (the copy of its upper character, an ideograph of the upper line, a final character of the wrong
tone) makes that rule give way: the rule is dropped before the search and named in the answer's `relaxed`.

**Alternatives** of a line: for each position, the best other characters that keep the *whole* line valid under
every rule with the rest of the line unchanged (a repeated group's positions change together), each with the
score of the line it makes, so pinning one always has a valid answer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Mapping

import numpy as np

from couplet.data.punct import is_ideograph, is_punct
from couplet.data.vocab import UNK, Vocab
from couplet.decoding.constraints import (
    PING,
    ZE,
    DecodeOptions,
    char_tone,
    final_position,
    final_tone,
    plan_groups,
    vocab_tables,
)

if TYPE_CHECKING:
    from couplet.decoding.blocklist import Blocklist
    from couplet.decoding.settings import DecodeSettings

__all__ = ["MAX_ALTERNATIVES", "RequestError", "alternatives", "check_pins"]

MAX_ALTERNATIVES = 20


class RequestError(ValueError):
    """A pin, blocklist or alternatives request that cannot be answered (one line, fit to show a user)."""


def check_pins(upper: str, pins: Mapping[int, str], vocab: Vocab, options: DecodeOptions) -> tuple[DecodeOptions, list[str]]:
    """`options` with the pins set and the rules they forbid dropped; and those rules' names (they gave way)."""
    if not pins:
        return options, []
    stoi = vocab.stoi
    for position, ch in pins.items():
        where = f"pin {position}={ch}"
        if not isinstance(position, int) or not 0 <= position < len(upper):
            raise RequestError(f"{where}: position out of range (the line has positions 0 to {len(upper) - 1})")
        if not isinstance(ch, str) or len(ch) != 1:
            raise RequestError(f"{where}: a pin is one character")
        if is_punct(upper[position]):
            raise RequestError(f"{where}: position {position} is punctuation ({upper[position]}), copied as it is")
        if is_punct(ch):
            raise RequestError(f"{where}: a pin must be a character, not punctuation")
        if stoi.get(ch, UNK) <= UNK:
            raise RequestError(f"{where}: {ch} is not in the model's vocabulary")
        if ch in options.banned:
            raise RequestError(f"{where}: {ch} is on the blocklist")
    if options.repetition:
        by_upper: dict[str, str] = {}
        by_char: dict[str, str] = {}
        for position, ch in sorted(pins.items()):
            u = upper[position]
            if by_upper.setdefault(u, ch) != ch:
                raise RequestError(f"pins {ch} and {by_upper[u]} conflict with the repetition structure: "
                                   f"positions with the same upper character {u} take the same character")
            if by_char.setdefault(ch, u) != u:
                raise RequestError(f"pins conflict with the repetition structure: {ch} is pinned under both "
                                   f"{by_char[ch]} and {u}, which must take different characters")
    given_way = []
    if options.no_copy and any(upper[p] == ch for p, ch in pins.items()):
        given_way.append("no_copy")
    if options.no_reuse and any(is_ideograph(ch) and ch in upper for ch in pins.values()):
        given_way.append("no_reuse")
    final = final_position(upper)
    if options.tone and final in pins and final_tone(upper) == (PING if options.mirror else ZE):
        if char_tone(pins[final]) != (ZE if options.mirror else PING):
            given_way.append("tone")
    pinned = replace(options, pins=tuple(sorted(pins.items())), **dict.fromkeys(given_way, False))
    return pinned, given_way


def alternatives(
    upper: str, lp: np.ndarray, vocab: Vocab, settings: "DecodeSettings", options: DecodeOptions, line: str, n: int,
    blocklist: "Blocklist | None" = None,
) -> list[list[tuple[str, float]]]:
    """For each position of `line` (the answer to `upper`), the `n` best other characters, each with the score of the
    line it makes (as `settings` score lines), best first; [] at punctuation positions. The rest of the line stays:
    only characters every rule allows there and no other group uses are offered, and none that puts a blocked word
    in the line. `options`' pins are not applied here (an alternative replaces the pin at its position)."""
    if not 0 <= n <= MAX_ALTERNATIVES:
        raise RequestError(f"alternatives must be from 0 to {MAX_ALTERNATIVES}, got {n}")
    if n == 0 or not line:
        return [[] for _ in line]
    from couplet.decoding.settings import DecodeSettings, line_scores

    if options.mirror:  # the LM and the phrase memory are of lower lines: the reverse direction answers without them
        settings = DecodeSettings(settings.config)
    tables = vocab_tables(vocab)
    free = replace(options, pins=())
    scored_lp = settings_rows(upper, lp, vocab, settings)
    plan = plan_groups(upper, scored_lp, tables, free, dtype=np.float64)
    stoi, itos = tables.stoi, tables.itos
    group_char = {g: line[i] for i, g in enumerate(plan.group_of)}
    used = {stoi.get(ch, -1) for ch in group_char.values()}
    offered: dict[int, list[str]] = {}  # group -> the characters whose lines are scored
    lines: list[str] = []
    for g, current in group_char.items():
        offered[g] = []
        if g in plan.fixed:
            continue
        row = plan.scores[g].copy()  # PAD/UNK and every rule already masked
        if plan.distinct:
            row[[u for u in used if u >= 0]] = -np.inf  # the line's own characters: its other groups', and this one's
        else:
            row[stoi.get(current, UNK)] = -np.inf
        size = min(4 * n + 8, row.size)
        pool = np.argpartition(-row, size - 1)[:size] if size < row.size else np.arange(row.size)
        pool = pool[np.isfinite(row[pool])]
        for c in pool[np.argsort(-row[pool], kind="stable")].tolist():
            text = "".join(itos[c] if group == g else ch for group, ch in zip(plan.group_of, line))
            if blocklist is None or blocklist.find(text) is None:
                offered[g].append(itos[c])
                lines.append(text)
    scores = line_scores(upper, lines, lp, vocab, settings).tolist()  # every group's lines in one call
    per_group, start = {}, 0
    for g, chars in offered.items():
        per_group[g] = sorted(zip(chars, scores[start : start + len(chars)]), key=lambda item: -item[1])[:n]
        start += len(chars)
    return [per_group[g] for g in plan.group_of]


def settings_rows(upper: str, lp: np.ndarray, vocab: Vocab, settings: "DecodeSettings") -> np.ndarray:
    """The rows the search ranks characters by: the model's, plus the phrase terms separable by position when the settings fuse them."""
    from couplet.decoding.beam import fused_rows

    return fused_rows(upper, lp[: len(upper)], vocab, settings.phrases, settings.phrase_weights)
