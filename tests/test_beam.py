"""Beam search with the LM fused: every constraint holds, scores are model + weight·LM, and on small cases the
answer is the brute-force optimum (with lm_weight 0: the exact decoder's)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from couplet.decoding.beam import LMCoupling, _beam_search, beam_decode
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
from couplet.decoding.decode import decode
from couplet.decoding.lm import CharBigramLM
from couplet.evaluation.metrics import repetition_match
from couplet.data.punct import is_ideograph, is_punct
from couplet.data.vocab import PAD_TOKEN, UNK, UNK_TOKEN, Vocab

PING_CHARS = "天风花春山红人云"
ZE_CHARS = "月雨水柳树地夜草"
VOCAB = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *PING_CHARS, *ZE_CHARS, *"的了", *"，。！"])
SMALL = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *"天风花月雨水的，。"])
UPPER_CHARS = PING_CHARS[:4] + ZE_CHARS[:4] + "，的；"  # ； is not in the vocabulary: copied anyway


def _log_probs(rng: np.random.Generator, length: int, vocab: Vocab, scale: float = 3.0) -> np.ndarray:
    logits = rng.standard_normal((length, len(vocab))) * scale
    logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return logits.astype(np.float32)


def _random_lm(vocab: Vocab, seed: int, n_lines: int = 60) -> CharBigramLM:
    rng = np.random.default_rng(seed)
    chars = vocab.itos[2:]
    lines = ["".join(rng.choice(chars, size=int(rng.integers(2, 8)))) for _ in range(n_lines)]
    return CharBigramLM.fit(lines, vocab, interpolation=0.8)


LM = _random_lm(VOCAB, 0)
SMALL_LM = _random_lm(SMALL, 1, n_lines=30)


def _fused(lower: str, lp: np.ndarray, vocab: Vocab, lm: CharBigramLM | None, weight: float) -> float:
    """model + weight·LM, recomputed from the LM's rows (a mark outside the vocabulary adds 0, then acts as UNK)."""
    score, prev = 0.0, None
    for i, ch in enumerate(lower):
        cid = vocab.stoi.get(ch, UNK)
        if cid != UNK:
            score += float(lp[i, cid])
            if lm is not None and weight:
                score += weight * float(lm.next_log_probs(prev)[cid])
        prev = cid
    return score


def _satisfies(upper: str, lower: str, options: DecodeOptions) -> bool:
    """The constraints, position by position, independently of both decoders."""
    if len(lower) != len(upper) or PAD_TOKEN in lower or UNK_TOKEN in lower:
        return False
    for u, low in zip(upper, lower):
        if options.punctuation and (is_punct(u) and low != u or not is_punct(u) and is_punct(low)):
            return False
        if options.no_copy and low == u and not (options.punctuation and is_punct(u)):
            return False
    if options.repetition and not repetition_match(upper, lower):
        return False
    if options.tone and final_tone(upper) == ZE and char_tone(lower[final_position(upper)]) != PING:
        return False
    if options.no_reuse and _reused(upper, lower):
        return False
    return True


def _reused(upper: str, lower: str) -> set[str]:
    """The upper line's ideographs found anywhere in the lower line (不重字 forbids any)."""
    return {ch for ch in upper if is_ideograph(ch) and ch in lower}


def _brute_force(upper, lp, vocab, options, lm, weight) -> list[tuple[str, float]]:
    choices = [[u] if options.punctuation and is_punct(u) else vocab.itos[2:] for u in upper]
    lines = ("".join(combo) for combo in itertools.product(*choices))
    out = [(line, _fused(line, lp, vocab, lm, weight)) for line in lines if _satisfies(upper, line, options)]
    return sorted(out, key=lambda item: -item[1])


def _random_upper(rng: np.random.Generator, chars: str, max_len: int) -> str:
    return "".join(rng.choice(list(chars), size=int(rng.integers(1, max_len + 1))))


# --------------------------------------------------------------------------- properties on random lines


def test_every_candidate_keeps_every_constraint_and_is_scored_as_documented():
    rng = np.random.default_rng(42)
    for _ in range(300):
        upper = _random_upper(rng, UPPER_CHARS, 9)
        lp = _log_probs(rng, len(upper), VOCAB)
        top_k = int(rng.integers(1, 6))
        weight = float(rng.choice([0.0, 0.3, 1.0, 3.0]))
        lm = LM if rng.random() < 0.8 else None
        options = DecodeOptions(tone=bool(rng.random() < 0.5))
        res = beam_decode(upper, lp, VOCAB, top_k=top_k, options=options, lm=lm, lm_weight=weight,
                          beam_size=int(rng.integers(1, 9)))
        assert res.relaxed == []
        lowers = [lower for lower, _ in res.candidates]
        n_expected = 1 if all(is_punct(u) for u in upper) else top_k  # all marks: one possible line
        assert len(lowers) == n_expected and len(set(lowers)) == n_expected
        scores = [score for _, score in res.candidates]
        assert scores == sorted(scores, reverse=True)
        for lower, score in res.candidates:
            assert _satisfies(upper, lower, options), (upper, lower)
            assert score == pytest.approx(_fused(lower, lp, VOCAB, lm, weight), abs=1e-4)
        tone_applies = options.tone and final_tone(upper) == ZE
        assert ("tone" in res.constraints) == tone_applies
        assert {"punctuation", "no_copy", "repetition", "no_reuse"} <= set(res.constraints)
        assert not any(_reused(upper, lower) for lower in lowers)
        # fusion never answers worse (by its own score) than the exact model-only decoder's best line
        exact_best = decode(upper, lp, VOCAB, options=options).candidates[0][0]
        assert scores[0] >= _fused(exact_best, lp, VOCAB, lm, weight) - 1e-6


def test_each_constraint_alone_holds():
    rng = np.random.default_rng(3)
    names = ("no_copy", "punctuation", "repetition", "tone", "no_reuse")
    for _ in range(120):
        options = DecodeOptions(**{name: bool(rng.random() < 0.5) for name in names})
        upper = _random_upper(rng, UPPER_CHARS, 7)
        lp = _log_probs(rng, len(upper), VOCAB)
        res = beam_decode(upper, lp, VOCAB, top_k=3, options=options, lm=LM, lm_weight=1.0, beam_size=4)
        only_marks = options.punctuation and all(is_punct(u) for u in upper)
        assert res.relaxed == [] and len(res.candidates) == (1 if only_marks else 3)
        for lower, score in res.candidates:
            assert _satisfies(upper, lower, options)
            assert score == pytest.approx(_fused(lower, lp, VOCAB, LM, 1.0), abs=1e-4)


# --------------------------------------------------------------------------- exactness on small cases


def test_large_beam_finds_the_brute_force_optimum_with_the_lm():
    rng = np.random.default_rng(7)
    names = ("no_copy", "punctuation", "repetition", "tone", "no_reuse")
    for _ in range(100):
        upper = _random_upper(rng, "天月风雨，的", 4)
        options = DecodeOptions(**{name: bool(rng.random() < 0.7) for name in names})
        lp = _log_probs(rng, len(upper), SMALL)
        weight = float(rng.choice([0.3, 1.0, 3.0]))
        top_k = int(rng.integers(1, 4))
        expected = _brute_force(upper, lp, SMALL, options, SMALL_LM, weight)[:top_k]
        res = beam_decode(upper, lp, SMALL, top_k=top_k, options=options, lm=SMALL_LM, lm_weight=weight,
                          beam_size=10_000)
        if not expected:  # no_reuse leaves too few characters: relaxed, as decode relaxes
            assert res.relaxed and res.relaxed == decode(upper, lp, SMALL, options=options).relaxed
            continue
        assert res.relaxed == []
        assert [s for _, s in res.candidates] == pytest.approx([s for _, s in expected], abs=1e-4)
        # the beam alone (without decode's lines joining the finalists) is exact too
        plan = plan_groups(upper, lp, vocab_tables(SMALL), options, dtype=np.float64)
        rows, _ = _beam_search(lp, plan, SMALL.stoi, [LMCoupling(SMALL_LM, weight)] if weight else [], 10_000)
        best = "".join(plan.fixed.get(g, "") or SMALL.itos[c] for g, c in zip(plan.group_of, rows[0]))
        assert _fused(best, lp, SMALL, SMALL_LM, weight) == pytest.approx(expected[0][1], abs=1e-4)


def test_without_lm_weight_the_beam_agrees_with_the_exact_decoder():
    rng = np.random.default_rng(11)
    for _ in range(60):
        upper = _random_upper(rng, "天月风雨，的", 4)
        options = DecodeOptions(tone=bool(rng.random() < 0.5))
        lp = _log_probs(rng, len(upper), SMALL)
        exact = decode(upper, lp, SMALL, top_k=2, options=options)
        assert beam_decode(upper, lp, SMALL, top_k=2, options=options, lm=SMALL_LM, lm_weight=0.0).candidates \
            == exact.candidates
        assert beam_decode(upper, lp, SMALL, top_k=2, options=options, lm=None, lm_weight=1.0).candidates \
            == exact.candidates
        kept = replace(options, **dict.fromkeys(exact.relaxed, False))  # no_reuse may leave SMALL too few characters
        plan = plan_groups(upper, lp, vocab_tables(SMALL), kept, dtype=np.float64)
        rows, _ = _beam_search(lp, plan, SMALL.stoi, [], 10_000)
        best = "".join(plan.fixed.get(g, "") or SMALL.itos[c] for g, c in zip(plan.group_of, rows[0]))
        assert _fused(best, lp, SMALL, None, 0.0) == pytest.approx(exact.candidates[0][1], abs=1e-4)
        brute = _brute_force(upper, lp, SMALL, kept, None, 0.0)
        assert exact.candidates[0][1] == pytest.approx(brute[0][1], abs=1e-4)


# --------------------------------------------------------------------------- behaviour


def test_the_lm_changes_the_answer_when_it_should():
    vocab = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *"天风花月雨水"])
    s = vocab.stoi
    lp = np.full((2, len(vocab)), -8.0, dtype=np.float32)
    lp[0, s["风"]] = -0.1
    lp[1, s["花"]], lp[1, s["雨"]] = -0.5, -0.9  # the model prefers 风花 ...
    lm = CharBigramLM.fit(["风雨"] * 50 + ["花月", "水天"], vocab)  # ... the lower lines always say 风雨
    plain = beam_decode("山水", lp, vocab, lm=lm, lm_weight=0.0)
    fused = beam_decode("山水", lp, vocab, lm=lm, lm_weight=1.0)
    assert plain.candidates[0][0] == "风花" and fused.candidates[0][0] == "风雨"
    assert fused.candidates[0][1] == pytest.approx(_fused("风雨", lp, vocab, lm, 1.0), abs=1e-5)
    weak = beam_decode("山水", lp, vocab, lm=lm, lm_weight=0.01)  # a small weight leaves the model in charge
    assert weak.candidates[0][0] == "风花"


def test_repeated_characters_are_forced_and_scored_by_the_lm_at_every_position():
    vocab = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *"天风花月雨水"])
    lp = _log_probs(np.random.default_rng(5), 4, vocab)
    res = beam_decode("山山水水", lp, vocab, top_k=3, lm=_random_lm(vocab, 2), lm_weight=1.0)
    for lower, _ in res.candidates:
        assert lower[0] == lower[1] != lower[2] == lower[3]


def test_punctuation_missing_from_the_vocabulary_is_copied():
    rng = np.random.default_rng(9)
    vocab = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *"天风花月"])
    lm = _random_lm(vocab, 3)
    lp = _log_probs(rng, 3, vocab)
    res = beam_decode("天；月", lp, vocab, top_k=2, lm=lm, lm_weight=1.0)
    for lower, score in res.candidates:
        assert lower[1] == "；" and score == pytest.approx(_fused(lower, lp, vocab, lm, 1.0), abs=1e-5)


def test_impossible_constraints_are_relaxed_like_decode():
    vocab = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *"天风"])
    lp = _log_probs(np.random.default_rng(5), 3, vocab)
    res = beam_decode("山水云", lp, vocab, lm=_random_lm(vocab, 4), lm_weight=1.0)
    assert res.relaxed == decode("山水云", lp, vocab).relaxed == ["repetition"]
    assert res.candidates and len(res.candidates[0][0]) == 3 and "repetition" not in res.constraints


def test_bad_arguments_and_the_empty_line():
    lp = _log_probs(np.random.default_rng(0), 2, VOCAB)
    with pytest.raises(ValueError):
        beam_decode("天风", lp[:1], VOCAB, lm=LM, lm_weight=1.0)
    with pytest.raises(ValueError):
        beam_decode("天", np.zeros((1, 3), dtype=np.float32), VOCAB, lm=LM, lm_weight=1.0)
    for bad in ({"top_k": 0}, {"beam_size": 0}, {"lm_weight": -1.0}):
        with pytest.raises(ValueError):
            beam_decode("天风", lp, VOCAB, **{"lm": LM, "lm_weight": 1.0, **bad})
    with pytest.raises(ValueError):
        beam_decode("天风", lp, VOCAB, lm=SMALL_LM, lm_weight=1.0)  # LM of another vocabulary
    empty = beam_decode("", np.zeros((0, len(VOCAB)), dtype=np.float32), VOCAB, lm=LM, lm_weight=1.0)
    assert empty.candidates == [("", 0.0)]
    padded = _log_probs(np.random.default_rng(2), 5, VOCAB)  # extra (padding) rows are ignored
    assert beam_decode("天风", padded, VOCAB, lm=LM, lm_weight=1.0).candidates == \
        beam_decode("天风", padded[:2], VOCAB, lm=LM, lm_weight=1.0).candidates


# --------------------------------------------------------------------------- no_reuse (不重字)


TINY = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *"天风"])  # an upper line of both characters leaves no_reuse nothing
TINY_LM = _random_lm(TINY, 2, n_lines=10)


def test_no_upper_ideograph_in_any_fused_answer_unless_no_reuse_is_relaxed():
    rng = np.random.default_rng(23)
    names = ("no_copy", "punctuation", "repetition", "tone", "no_reuse")
    seen_relaxed = 0
    for _ in range(200):
        kind = rng.random()
        vocab, lm = (TINY, TINY_LM) if kind < 0.2 else (SMALL, SMALL_LM) if kind < 0.6 else (VOCAB, LM)
        upper = _random_upper(rng, "天风" if vocab is TINY else "天月风雨花水，的", 6)
        options = DecodeOptions(**{name: bool(rng.random() < 0.7) for name in names})
        lp = _log_probs(rng, len(upper), vocab)
        top_k = int(rng.integers(1, 5))
        res = beam_decode(upper, lp, vocab, top_k=top_k, options=options, lm=lm, lm_weight=float(rng.choice([0.3, 1.0, 3.0])),
                          beam_size=int(rng.integers(1, 9)))
        assert res.candidates and res.relaxed == decode(upper, lp, vocab, options=options).relaxed
        if "no_reuse" in res.relaxed:
            seen_relaxed += 1
            requested = [name for name in ("tone", "repetition", "punctuation", "no_copy") if getattr(options, name)]
            assert res.relaxed == [*requested, "no_reuse"]  # the last rule dropped
            continue
        for lower, _ in res.candidates:
            assert _satisfies(upper, lower, replace(options, **dict.fromkeys(res.relaxed, False))), (upper, lower)
            assert not options.no_reuse or not _reused(upper, lower)
    assert seen_relaxed  # the tiny vocabulary does force it sometimes


def test_no_reuse_off_is_the_beam_without_the_rule():
    """With no_reuse off the beam answers as before the rule (brute force without it); on, it equals brute force
    with it, where a line satisfies every rule."""
    rng = np.random.default_rng(29)
    for _ in range(60):
        upper = _random_upper(rng, "天月风雨，的", 3)
        lp = _log_probs(rng, len(upper), SMALL)
        for no_reuse in (False, True):
            options = DecodeOptions(no_reuse=no_reuse)
            expected = _brute_force(upper, lp, SMALL, options, SMALL_LM, 1.0)[:2]
            if not expected:
                continue
            res = beam_decode(upper, lp, SMALL, top_k=2, options=options, lm=SMALL_LM, lm_weight=1.0, beam_size=10_000)
            assert res.relaxed == [] and ("no_reuse" in res.constraints) == no_reuse
            assert [s for _, s in res.candidates] == pytest.approx([s for _, s in expected], abs=1e-4)
