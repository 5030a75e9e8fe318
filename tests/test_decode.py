"""The couplet decoder: constraints always hold, top-k is the exact optimum, and it is fast."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from couplet.decoding.constraints import (
    ARGMAX,
    CONSTRAINED,
    PING,
    ZE,
    DecodeOptions,
    char_tone,
    final_position,
    final_tone,
    plan_groups,
    vocab_tables,
)
from couplet.decoding.decode import decode, decode_argmax
from couplet.evaluation.metrics import repetition_match
from couplet.data.punct import PUNCTUATION, is_ideograph, is_punct
from couplet.data.vocab import PAD_TOKEN, UNK, UNK_TOKEN, Vocab

PING_CHARS = "天风花春山红人云"
ZE_CHARS = "月雨水柳树地夜草"
NO_TONE = "的了"
MARKS = "，。！"
VOCAB = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *PING_CHARS, *ZE_CHARS, *NO_TONE, *MARKS])


def _log_probs(seed: int, length: int, vocab: Vocab = VOCAB, scale: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((length, len(vocab))) * scale
    logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return logits.astype(np.float32)


def _line_score(lp: np.ndarray, lower: str, vocab: Vocab) -> float:
    return float(sum(lp[i, vocab.stoi[ch]] for i, ch in enumerate(lower) if ch in vocab.stoi))


def _satisfies(upper: str, lower: str, options: DecodeOptions) -> bool:
    """The constraints, written independently of the decoder (position by position)."""
    if len(lower) != len(upper):
        return False
    for u, l in zip(upper, lower):
        if options.punctuation:
            if is_punct(u) and l != u:
                return False
            if not is_punct(u) and is_punct(l):
                return False
        if options.no_copy and l == u and not (options.punctuation and is_punct(u)):
            return False
    if options.repetition and not repetition_match(upper, lower):
        return False
    if options.tone and final_tone(upper) == ZE:
        if char_tone(lower[final_position(upper)]) != PING:
            return False
    if options.no_reuse and _reused(upper, lower):
        return False
    return True


def _reused(upper: str, lower: str) -> set[str]:
    """The upper line's ideographs found anywhere in the lower line (不重字 forbids any)."""
    return {ch for ch in upper if is_ideograph(ch) and ch in lower}


def _brute_force(upper: str, lp: np.ndarray, vocab: Vocab, options: DecodeOptions) -> list[tuple[str, float]]:
    chars = vocab.itos[2:]
    out = []
    for combo in itertools.product(chars, repeat=len(upper)):
        lower = "".join(combo)
        if _satisfies(upper, lower, options):
            out.append((lower, _line_score(lp, lower, vocab)))
    out.sort(key=lambda item: -item[1])
    return out


upper_lines = st.lists(
    st.sampled_from(PING_CHARS[:4] + ZE_CHARS[:4] + "，的"), min_size=1, max_size=9
).map("".join)
all_options = st.builds(DecodeOptions, st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.booleans())


# --------------------------------------------------------------------------- constraints always hold


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(upper=upper_lines, seed=st.integers(0, 2**31), top_k=st.integers(1, 5), tone=st.booleans())
def test_constrained_decoding_keeps_every_constraint(upper, seed, top_k, tone):
    lp = _log_probs(seed, len(upper))
    options = DecodeOptions(tone=tone)
    res = decode(upper, lp, VOCAB, top_k=top_k, options=options)
    assert res.relaxed == []
    assert 1 <= len(res.candidates) <= top_k
    lowers = [lower for lower, _ in res.candidates]
    assert len(set(lowers)) == len(lowers)
    scores = [score for _, score in res.candidates]
    assert scores == sorted(scores, reverse=True)
    for lower, score in res.candidates:
        assert len(lower) == len(upper)
        assert PAD_TOKEN not in lower and UNK_TOKEN not in lower
        for u, l in zip(upper, lower):
            if is_punct(u):
                assert l == u  # the mark is copied
            else:
                assert not is_punct(l) and l != u  # no punctuation, no same-position copy
        assert not _reused(upper, lower)  # 不重字: no upper ideograph anywhere
        assert repetition_match(upper, lower)  # 叠字 stays 叠字, distinct stays distinct
        if tone and final_tone(upper) == ZE:
            assert char_tone(lower[final_position(upper)]) == PING
        assert score == pytest.approx(_line_score(lp, lower, VOCAB), abs=1e-4)
    assert "tone" in res.constraints if tone and final_tone(upper) == ZE else "tone" not in res.constraints


@settings(max_examples=150, deadline=None)
@given(
    upper=st.lists(st.sampled_from("天月风雨，的"), min_size=1, max_size=4).map("".join),
    seed=st.integers(0, 2**31),
    top_k=st.integers(1, 4),
    options=all_options,
)
def test_top_k_equals_brute_force(upper, seed, top_k, options):
    vocab = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *"天风花月雨水的，。"])
    lp = _log_probs(seed, len(upper), vocab)
    expected = _brute_force(upper, lp, vocab, options)[:top_k]
    got = decode(upper, lp, vocab, top_k=top_k, options=options)
    if not expected:  # no line satisfies them all (no_reuse leaves few characters): something was relaxed
        assert got.relaxed and got.candidates
        return
    assert got.relaxed == []
    assert [s for _, s in got.candidates] == pytest.approx([s for _, s in expected], abs=1e-4)
    for lower, _ in got.candidates:
        assert _satisfies(upper, lower, options)


@settings(max_examples=60, deadline=None)
@given(
    upper=st.lists(st.sampled_from("天月风雨，的"), min_size=1, max_size=4).map("".join),
    seed=st.integers(0, 2**31),
    top_k=st.integers(1, 4),
)
def test_murty_fallback_is_exact_too(upper, seed, top_k):
    """With no search budget the decoder finishes with Murty's algorithm; same answers."""
    vocab = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *"天风花月雨水的，。"])
    lp = _log_probs(seed, len(upper), vocab)
    expected = _brute_force(upper, lp, vocab, CONSTRAINED)[:top_k]
    got = decode(upper, lp, vocab, top_k=top_k, options=CONSTRAINED, max_pops=0)
    assert bool(got.relaxed) == (not expected)
    if not expected:
        expected = _brute_force(upper, lp, vocab, replace(CONSTRAINED, **dict.fromkeys(got.relaxed, False)))[:top_k]
    assert [s for _, s in got.candidates] == pytest.approx([s for _, s in expected], abs=1e-4)


def test_top1_is_the_assignment_optimum_on_long_lines_with_conflicts():
    """All groups want the same few characters: top-1 must equal the Hungarian optimum."""
    from scipy.optimize import linear_sum_assignment

    chars = [chr(0x4E00 + i) for i in range(60)]
    vocab = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *chars])
    rng = np.random.default_rng(7)
    for trial in range(30):
        length = int(rng.integers(8, 25))
        upper = "".join(rng.choice(chars[:12], size=length))  # many repeats
        base = rng.standard_normal(len(vocab)) * 4  # shared preferences -> many conflicts
        lp = (base + rng.standard_normal((length, len(vocab)))).astype(np.float32)
        res = decode(upper, lp, vocab, top_k=3, options=CONSTRAINED)
        groups = list(dict.fromkeys(upper))
        weights = np.stack([lp[[i for i, ch in enumerate(upper) if ch == g]].sum(axis=0) for g in groups])
        weights[:, :2] = -1e9  # PAD, UNK
        weights[:, [vocab.stoi[g] for g in groups]] = -1e9  # no reuse (so no copy): no upper character anywhere
        rows, cols = linear_sum_assignment(weights, maximize=True)
        assert res.candidates[0][1] == pytest.approx(float(weights[rows, cols].sum()), abs=1e-3)
        assert [s for _, s in res.candidates] == sorted((s for _, s in res.candidates), reverse=True)
        budgetless = decode(upper, lp, vocab, top_k=3, options=CONSTRAINED, max_pops=0)
        assert [s for _, s in budgetless.candidates] == pytest.approx([s for _, s in res.candidates], abs=1e-3)


# --------------------------------------------------------------------------- behaviour


def test_argmax_mode_is_the_seed_decoding_without_pad_unk():
    lp = _log_probs(3, 6)
    lp[:, UNK] = 10.0  # UNK would win everywhere
    upper = "天天月，雨的"
    res = decode_argmax(upper, lp, VOCAB)
    masked = lp.copy()
    masked[:, :2] = -np.inf
    expected = "".join(VOCAB.itos[i] for i in masked.argmax(axis=1))
    assert res.candidates[0][0] == expected
    assert res.constraints == []
    assert decode(upper, lp, VOCAB, options=ARGMAX).candidates == res.candidates


def test_argmax_top_k_is_k_best_of_independent_positions():
    vocab = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *"天风花月雨水"])
    lp = _log_probs(11, 3, vocab)
    got = decode_argmax("天月天", lp, vocab, top_k=5)
    expected = _brute_force("天月天", lp, vocab, ARGMAX)[:5]
    assert [s for _, s in got.candidates] == pytest.approx([s for _, s in expected], abs=1e-5)


def test_repetition_groups_score_by_the_sum_of_their_positions():
    vocab = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *"天风花月"])
    lp = np.full((2, len(vocab)), -10.0, dtype=np.float32)
    s = vocab.stoi
    lp[0, s["风"]], lp[0, s["花"]] = -0.1, -1.0
    lp[1, s["月"]], lp[1, s["花"]] = -0.1, -1.0
    res = decode("雨雨", lp, vocab, options=CONSTRAINED)
    assert res.candidates[0][0] == "花花"  # -2.0 beats 风风 (-10.1) and 月月 (-10.1)
    res = decode("雨雪", lp, vocab, options=CONSTRAINED)
    assert res.candidates[0][0] == "风月"


def test_plan_groups_sums_and_masks_alike_in_float32_and_float64():
    """decode (float32 matmul) and the beam (float64, position by position) share `plan_groups`: same groups,
    fixed marks and masks; a group's row is the sum of its positions' rows in either precision."""
    rng = np.random.default_rng(3)
    chars = PING_CHARS[:3] + ZE_CHARS[:3] + "的，；"  # ； is not in the vocabulary
    names = ("no_copy", "punctuation", "repetition", "tone", "no_reuse")
    for seed in range(200):
        upper = "".join(rng.choice(list(chars), int(rng.integers(1, 9))))
        options = DecodeOptions(**{name: bool(rng.random() < 0.6) for name in names})
        lp = _log_probs(seed, len(upper))
        p32 = plan_groups(upper, lp, vocab_tables(VOCAB), options)
        p64 = plan_groups(upper, lp, vocab_tables(VOCAB), options, dtype=np.float64)
        assert p32.scores.dtype == np.float32 and p64.scores.dtype == np.float64
        for name in ("group_of", "fixed", "distinct", "applied"):
            assert getattr(p32, name) == getattr(p64, name)
        assert np.array_equal(np.isfinite(p32.scores), np.isfinite(p64.scores))
        for g in range(p64.scores.shape[0]):
            members = [i for i, h in enumerate(p64.group_of) if h == g]
            assert members and (options.repetition or members == [g])
            finite = np.isfinite(p64.scores[g])
            total = lp[members].astype(np.float64).sum(axis=0)
            np.testing.assert_allclose(p64.scores[g][finite], total[finite], rtol=0, atol=1e-9)
            np.testing.assert_allclose(p32.scores[g][finite], total[finite], rtol=0, atol=1e-4)


def test_no_copy_and_punctuation():
    vocab = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *"天风花，。"])
    lp = np.full((3, len(vocab)), -5.0, dtype=np.float32)
    lp[0, vocab.stoi["天"]] = 0.0  # the copy is the model's favourite
    lp[1, vocab.stoi["。"]] = 0.0  # a different mark
    lp[2, vocab.stoi["，"]] = 0.0  # punctuation at a character position
    res = decode("天，风", lp, vocab, options=CONSTRAINED)
    lower = res.candidates[0][0]
    assert lower[1] == "，" and lower[0] != "天" and lower[2] not in PUNCTUATION
    assert decode("天，风", lp, vocab, options=ARGMAX).candidates[0][0] == "天。，"


def test_punctuation_missing_from_the_vocabulary_is_copied():
    vocab = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *"天风花月"])
    lp = _log_probs(1, 3, vocab)
    res = decode("天；月", lp, vocab)
    assert res.candidates[0][0][1] == "；"


def test_tone_rule_only_when_upper_ends_in_ze():
    vocab = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *"天风月雨的"])
    lp = np.full((2, len(vocab)), -5.0, dtype=np.float32)
    lp[1, vocab.stoi["雨"]] = 0.0  # 仄, the model's favourite ending
    lp[1, vocab.stoi["的"]] = -0.5  # toneless: not allowed under the rule
    lp[1, vocab.stoi["风"]] = -1.0
    on = decode("山月", lp, vocab, options=DecodeOptions(tone=True))  # 月 is 仄 -> lower must end 平
    assert on.candidates[0][0][-1] == "风" and "tone" in on.constraints
    off = decode("山月", lp, vocab, options=DecodeOptions(tone=False))
    assert off.candidates[0][0][-1] == "雨"
    level = decode("山天", lp, vocab, options=DecodeOptions(tone=True))  # ends 平: rule does not apply
    assert level.candidates[0][0][-1] == "雨" and "tone" not in level.constraints


def test_final_position_skips_trailing_punctuation():
    assert final_position("春风，明月。") == 4
    assert final_tone("明月。") == ZE
    assert final_position("，。") is None


def test_impossible_constraints_are_relaxed_not_crashed():
    vocab = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *"天风"])
    lp = _log_probs(5, 3, vocab)
    res = decode("山水云", lp, vocab)  # three distinct groups, two characters
    assert res.candidates and "repetition" in res.relaxed
    assert len(res.candidates[0][0]) == 3


def test_bad_shapes_and_empty_line():
    with pytest.raises(ValueError):
        decode("天风", np.zeros((1, len(VOCAB)), dtype=np.float32), VOCAB)
    with pytest.raises(ValueError):
        decode("天", np.zeros((1, 3), dtype=np.float32), VOCAB)
    with pytest.raises(ValueError):
        decode("天", np.zeros((1, len(VOCAB)), dtype=np.float32), VOCAB, top_k=0)
    assert decode("", np.zeros((0, len(VOCAB)), dtype=np.float32), VOCAB).candidates == [("", 0.0)]
    padded = _log_probs(2, 5)  # extra (padding) rows are ignored
    assert decode("天风", padded, VOCAB).candidates == decode("天风", padded[:2], VOCAB).candidates


def test_a_masked_entry_of_one_position_leaves_the_other_groups_alone():
    """A -inf in a caller's matrix (a masked character) at a position without repeats: decode's float32 group sums
    must not turn the repeated group's row into NaN (0 * -inf in a membership matmul), which would make its
    constraint look unsatisfiable and relax it."""
    rng = np.random.default_rng(5)
    lp = (rng.standard_normal((3, len(VOCAB))) - 8.0).astype(np.float32)
    lp[2, VOCAB.stoi["风"]] = -np.inf
    options = DecodeOptions(no_copy=True, punctuation=True, repetition=True, tone=False)
    p32 = plan_groups("天天山", lp, vocab_tables(VOCAB), options)
    p64 = plan_groups("天天山", lp, vocab_tables(VOCAB), options, dtype=np.float64)
    assert not np.isnan(p32.scores).any()
    assert np.array_equal(np.isfinite(p32.scores), np.isfinite(p64.scores))
    finite = np.isfinite(p64.scores)
    np.testing.assert_allclose(p32.scores[finite], p64.scores[finite], rtol=0, atol=1e-4)
    result = decode("天天山", lp, VOCAB, options=options)
    assert result.relaxed == []
    best = result.candidates[0][0]
    assert best[0] == best[1] and best[2] != best[0] and best[2] != "风"


# --------------------------------------------------------------------------- no_reuse (不重字)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    upper=st.lists(st.sampled_from("天月风雨花水，的"), min_size=1, max_size=7).map("".join),
    seed=st.integers(0, 2**31),
    top_k=st.integers(1, 5),
    options=all_options,
    small=st.booleans(),
)
def test_no_upper_ideograph_in_any_answer_unless_no_reuse_is_relaxed(upper, seed, top_k, options, small):
    """Every candidate of the top k holds no ideograph of the upper line, unless `no_reuse` is reported relaxed; with
    a small vocabulary it sometimes must be, and then only after every other rule (it is relaxed last)."""
    vocab = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *"天风花月雨水的，。"]) if small else VOCAB
    lp = _log_probs(seed, len(upper), vocab)
    res = decode(upper, lp, vocab, top_k=top_k, options=options)
    assert res.candidates
    assert ("no_reuse" in res.constraints) == (options.no_reuse and "no_reuse" not in res.relaxed)
    if "no_reuse" in res.relaxed:
        requested = [name for name in ("tone", "repetition", "punctuation", "no_copy") if getattr(options, name)]
        assert res.relaxed == [*requested, "no_reuse"]  # the last rule dropped
    else:
        for lower, _ in res.candidates:
            assert not options.no_reuse or not _reused(upper, lower), (upper, lower)
            assert _satisfies(upper, lower, replace(options, **dict.fromkeys(res.relaxed, False)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(upper=upper_lines, seed=st.integers(0, 2**31), top_k=st.integers(1, 5), options=all_options)
def test_no_reuse_off_restores_the_answers_without_it(upper, seed, top_k, options):
    """`no_reuse=False` is the decoding before the rule existed: same plan as without the rule's mask, and where the
    unrestricted answers reuse nothing, the rule changes nothing."""
    lp = _log_probs(seed, len(upper))
    off = decode(upper, lp, VOCAB, top_k=top_k, options=replace(options, no_reuse=False))
    on = decode(upper, lp, VOCAB, top_k=top_k, options=replace(options, no_reuse=True))
    assert "no_reuse" not in off.constraints and "no_reuse" not in off.relaxed
    plan_off = plan_groups(upper, lp, vocab_tables(VOCAB), replace(options, no_reuse=False))
    plan_on = plan_groups(upper, lp, vocab_tables(VOCAB), replace(options, no_reuse=True))
    masked = [VOCAB.stoi[ch] for ch in set(upper) if is_ideograph(ch)]
    plan_off.scores[:, masked] = -np.inf
    assert np.array_equal(plan_off.scores, plan_on.scores)
    if on.relaxed == off.relaxed and not any(_reused(upper, lower) for lower, _ in off.candidates):
        assert on.candidates[0] == off.candidates[0]
        for (a, sa), (b, sb) in zip(on.candidates, off.candidates):
            assert sa == pytest.approx(sb, abs=1e-5)
    assert on.candidates[0][1] <= off.candidates[0][1] + 1e-5 or on.relaxed != off.relaxed


def test_no_reuse_keeps_repetition_groups_and_marks():
    """A repeated upper character maps to one repeated lower character, and that character (like every other) is no
    ideograph of the upper line; punctuation is copied, not masked."""
    vocab = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *"天风花月雨水，"])
    s = vocab.stoi
    lp = np.full((4, len(vocab)), -6.0, dtype=np.float32)
    lp[0, s["月"]] = lp[1, s["月"]] = -0.1  # the model would answer the upper's own 月 in the 天天 group
    lp[0, s["花"]] = lp[1, s["花"]] = -1.0
    lp[3, s["天"]] = -0.1  # ... and 天 after the mark
    lp[3, s["雨"]] = -2.0
    res = decode("天天，月", lp, vocab, top_k=2)
    assert res.relaxed == [] and "no_reuse" in res.constraints
    assert res.candidates[0][0] == "花花，雨"
    for lower, _ in res.candidates:
        assert lower[0] == lower[1] and lower[2] == "，" and not _reused("天天，月", lower)
    old = decode("天天，月", lp, vocab, options=replace(CONSTRAINED, no_reuse=False))
    assert old.candidates[0][0] == "月月，天"  # no same-position copy, but both characters reused


def test_no_reuse_is_relaxed_last():
    vocab = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *"天风"])
    lp = _log_probs(4, 2, vocab)
    res = decode("天风", lp, vocab, options=DecodeOptions(tone=True))  # every character is the upper's
    assert res.relaxed == ["tone", "repetition", "punctuation", "no_copy", "no_reuse"]  # every rule requested, in order
    assert res.candidates and res.constraints == []
    res = decode("天天", lp, vocab, top_k=2)  # 风风 reuses nothing: no rule is dropped
    assert res.relaxed == [] and res.candidates[0][0] == "风风" and len(res.candidates) == 1
