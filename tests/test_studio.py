"""Pins, the blocklist and alternatives (couplet.decoding.studio, blocklist, settings.search): every answer keeps
every rule plus the pins and holds no blocked word, and each alternative is valid when pinned."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from couplet.data.punct import is_punct
from couplet.decoding.blocklist import DEFAULT_BLOCKLIST, Blocklist
from couplet.decoding.constraints import PING, ZE, DecodeOptions, char_tone, final_position, final_tone
from couplet.decoding.settings import DecodeSettings, line_scores, search
from couplet.decoding.studio import RequestError, alternatives, check_pins
from couplet.core.config import DecodeConfig
from test_beam import PING_CHARS, UPPER_CHARS, VOCAB, ZE_CHARS, _log_probs, _satisfies
from test_phrases import MEMORY

IDEOGRAPHS = PING_CHARS + ZE_CHARS + "的了"
EXACT = DecodeSettings(DecodeConfig())
FUSED = DecodeSettings(DecodeConfig(phrase_uni=0.5, phrase_bi=1.0, phrase_tri=0.5), None, MEMORY)


def _kept(options: DecodeOptions, given_way: list[str]) -> DecodeOptions:
    return replace(options, **dict.fromkeys(given_way, False))


@st.composite
def requests(draw):
    upper = "".join(draw(st.lists(st.sampled_from(UPPER_CHARS), min_size=1, max_size=8)))
    seed = draw(st.integers(0, 2**32 - 1))
    free = [i for i, u in enumerate(upper) if not is_punct(u)]
    pins: dict[int, str] = {}
    by_upper: dict[str, str] = {}
    for position in draw(st.lists(st.sampled_from(free), unique=True, max_size=2)) if free else []:
        ch = by_upper.get(upper[position]) or draw(st.sampled_from(IDEOGRAPHS))
        if ch in by_upper.values() and by_upper.get(upper[position]) != ch:
            continue  # the same character under two upper characters breaks the repetition structure
        by_upper[upper[position]] = ch
        pins[position] = ch
    words = draw(st.lists(st.text(alphabet=IDEOGRAPHS, min_size=1, max_size=2), max_size=6))
    words = [w for w in words if w not in pins.values()]  # a pinned character that is blocked is refused (tested below)
    return upper, seed, pins, Blocklist(words), draw(st.booleans()), draw(st.booleans())


@given(requests())
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_answers_keep_every_rule_the_pins_and_the_blocklist_and_alternatives_are_valid_when_pinned(request):
    upper, seed, pins, blocklist, fused, tone = request
    decoding = FUSED if fused else EXACT
    lp = _log_probs(np.random.default_rng(seed), len(upper), VOCAB)
    options = replace(DecodeOptions(tone=tone), banned=blocklist.single_chars)
    try:
        pinned, given_way = check_pins(upper, pins, VOCAB, options)
    except RequestError:
        assert any(ch in blocklist.single_chars for ch in pins.values())
        return
    res = search(upper, lp, VOCAB, decoding, top_k=3, options=pinned, blocklist=blocklist)
    kept = _kept(options, given_way + res.relaxed)
    for lower, score in res.candidates:
        assert _satisfies(upper, lower, kept), (upper, lower, kept)
        assert all(lower[p] == ch for p, ch in pins.items()), (lower, pins)
        assert blocklist.find(lower) is None, (lower, blocklist.words)
        assert score == pytest.approx(line_scores(upper, [lower], lp, VOCAB, decoding)[0], abs=1e-3)
    if not res.candidates:
        return
    best = res.candidates[0][0]
    found = alternatives(upper, lp, VOCAB, decoding, pinned, best, 3, blocklist)
    assert len(found) == len(best)
    for i, options_here in enumerate(found):
        assert options_here == [] if is_punct(upper[i]) else len(options_here) <= 3
        for ch, score in options_here:
            assert ch != best[i]
            swapped = "".join(ch if upper[j] == upper[i] and kept.repetition or j == i else c for j, c in enumerate(best))
            # the rest of the line is unchanged and every rule still holds, so pinning it has an answer
            assert _satisfies(upper, swapped, replace(kept, no_copy=kept.no_copy)) or i in pins, (upper, best, swapped)
            assert blocklist.find(swapped) is None
            repinned = {p: c for p, c in pins.items() if upper[p] != upper[i]} | {i: ch}
            again_options, again_given = check_pins(upper, repinned, VOCAB, options)
            again = search(upper, lp, VOCAB, decoding, options=again_options, blocklist=blocklist)
            assert again.candidates and again.candidates[0][0][i] == ch
            if decoding is EXACT and not again_given and not given_way:
                assert again.candidates[0][1] >= score - 1e-4  # the swapped line itself qualifies


def test_impossible_pins_are_one_line_errors_naming_them():
    options = DecodeOptions()
    cases = [
        ("春风，花月", {7: "天"}, r"pin 7=天: position out of range \(the line has positions 0 to 4\)"),
        ("春风，花月", {2: "天"}, r"pin 2=天: position 2 is punctuation"),
        ("春风花月", {1: "，"}, r"pin 1=，: a pin must be a character, not punctuation"),
        ("春风花月", {1: "龘"}, r"pin 1=龘: 龘 is not in the model's vocabulary"),
        ("春风春月", {0: "天", 2: "雨"}, r"pins 雨 and 天 conflict with the repetition structure"),
        ("春风花月", {0: "天", 2: "天"}, r"pins conflict with the repetition structure: 天 is pinned under both 春 and 花"),
    ]
    for upper, pins, message in cases:
        with pytest.raises(RequestError, match=message) as info:
            check_pins(upper, pins, VOCAB, options)
        assert "\n" not in str(info.value)
    with pytest.raises(RequestError, match="天 is on the blocklist"):
        check_pins("春风", {0: "天"}, VOCAB, replace(options, banned=frozenset("天")))


def test_a_pin_a_rule_forbids_makes_that_rule_give_way_and_says_so():
    lp = _log_probs(np.random.default_rng(1), 4, VOCAB)
    for pins, rules in (({0: "春"}, ["no_copy", "no_reuse"]), ({0: "风"}, ["no_reuse"])):  # a copy is a reuse too
        pinned, given_way = check_pins("春风花月", pins, VOCAB, DecodeOptions())
        assert given_way == rules and not any(getattr(pinned, rule) for rule in rules)
        res = search("春风花月", lp, VOCAB, EXACT, options=pinned)
        assert res.candidates[0][0][0] == pins[0] and not set(rules) & set(res.constraints)
    upper = "春风花" + next(ch for ch in ZE_CHARS if char_tone(ch) == ZE)
    ze_char = next(ch for ch in ZE_CHARS if char_tone(ch) == ZE and ch not in upper)
    _, given_way = check_pins(upper, {3: ze_char}, VOCAB, DecodeOptions(tone=True))
    assert given_way == ["tone"]


def test_the_mirrored_tone_rule_ends_the_answer_oblique_after_a_level_line():
    rng = np.random.default_rng(4)
    upper = "月雨" + PING_CHARS[0]
    assert final_tone(upper) == PING
    for _ in range(20):
        lp = _log_probs(rng, len(upper), VOCAB)
        res = search(upper, lp, VOCAB, FUSED, options=DecodeOptions(tone=True, mirror=True))
        assert char_tone(res.candidates[0][0][final_position(upper)]) == ZE and "tone" in res.constraints


def test_blocklist_files_and_matching(tmp_path):
    default = Blocklist.default()
    assert len(default) > 10 and default.find("春风傻逼花") == "傻逼" and default.find("春风得意马蹄疾") is None
    assert default.source == str(DEFAULT_BLOCKLIST)
    words = tmp_path / "words.txt"
    words.write_text("# mine\n\n天风\n 月 \n", encoding="utf-8")
    mine = Blocklist.load(words)
    assert mine.words == {"天风", "月"} and mine.single_chars == {"月"} and mine.find("春天风") == "天风"
    both = Blocklist.for_settings(True, words)
    assert both.words == default.words | mine.words and Blocklist.for_settings(False) is None
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    for path, message in ((empty, "has no words"), (binary, r"is not UTF-8 text \(byte 0\)"),
                          (tmp_path / "none.txt", "blocklist file not found"), (tmp_path, "is a directory")):
        with pytest.raises(ValueError, match=message) as info:
            Blocklist.load(path)
        assert "\n" not in str(info.value)


def test_a_longer_blocked_word_gives_way_to_the_next_best_line():
    rng = np.random.default_rng(8)
    for _ in range(30):
        upper = "".join(rng.choice(list(UPPER_CHARS.replace("，", "").replace("；", "")), 4))
        lp = _log_probs(rng, 4, VOCAB)
        best = search(upper, lp, VOCAB, EXACT, top_k=4).candidates
        blocked = Blocklist([best[0][0][1:3]])  # a word of the best line
        res = search(upper, lp, VOCAB, EXACT, top_k=3, blocklist=blocked)
        clean = [line for line, _ in best if blocked.find(line) is None]
        assert [line for line, _ in res.candidates][: len(clean[:3])] == clean[:3]
        assert all(blocked.find(line) is None for line, _ in res.candidates)
