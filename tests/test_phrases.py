"""The aligned phrase memory (couplet.decoding.phrases): its counts, probabilities and file, and the search with it
fused in (couplet.decoding.beam): every rule holds, scores are what the module says, and a large beam is exact."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from couplet.decoding.beam import beam_decode
from couplet.decoding.constraints import DecodeOptions
from couplet.decoding.decode import decode
from couplet.decoding.phrases import PhraseMemory
from couplet.data.vocab import PAD_TOKEN, UNK, UNK_TOKEN, Vocab
from test_beam import SMALL, UPPER_CHARS, VOCAB, _log_probs, _random_upper, _satisfies

PAIRS = [("天风花月", "雨水的天"), ("天风雨水", "月花的风"), ("天风花月", "雨水的月"), ("花月", "风雨")]


def _ids(vocab: Vocab, line: str) -> np.ndarray:
    return np.array([vocab.stoi.get(ch, UNK) for ch in line], dtype=np.int64)


def _buckets(vocab: Vocab, pairs) -> dict:
    by_length: dict[int, list] = {}
    for up, down in pairs:
        by_length.setdefault(len(up), []).append((_ids(vocab, up), _ids(vocab, down)))
    return {n: (np.stack([u for u, _ in rows]), np.stack([d for _, d in rows])) for n, rows in by_length.items()}


def _random_memory(vocab: Vocab, seed: int, n_pairs: int = 80) -> PhraseMemory:
    rng = np.random.default_rng(seed)
    chars = [ch for ch in vocab.itos[2:] if ch not in "，。！"]
    pairs = []
    for _ in range(n_pairs):
        length = int(rng.integers(2, 7))
        pairs.append(("".join(rng.choice(chars, length)), "".join(rng.choice(chars, length))))
    return PhraseMemory.fit(_buckets(vocab, pairs), len(vocab))


MEMORY = _random_memory(VOCAB, 0)
SMALL_MEMORY = _random_memory(SMALL, 1, n_pairs=30)


def _count(memory: PhraseMemory, vocab: Vocab, up: str, down: str) -> int:
    table = memory.tables[len(up)]
    code = lambda text: sum(int(i) * len(vocab) ** (len(text) - 1 - k) for k, i in enumerate(_ids(vocab, text)))  # noqa: E731
    start, stop, _ = table.row(code(up))
    return int(table.lookup(start, stop, np.array([code(down)]))[0])


def test_counts_are_the_aligned_ngrams_of_the_pairs():
    memory = PhraseMemory.fit(_buckets(SMALL, PAIRS), len(SMALL))
    assert _count(memory, SMALL, "天", "雨") == 2 and _count(memory, SMALL, "天", "月") == 1
    assert _count(memory, SMALL, "天风", "雨水") == 2  # two pairs share the bigram at positions 0-1
    assert _count(memory, SMALL, "花月", "的天") == 1 and _count(memory, SMALL, "花月", "风雨") == 1  # any position
    assert _count(memory, SMALL, "天风花", "雨水的") == 2 and _count(memory, SMALL, "风花月", "水的月") == 1
    assert _count(memory, SMALL, "天风", "水雨") == 0 and _count(memory, SMALL, "雨雨", "天天") == 0
    pruned = PhraseMemory.fit(_buckets(SMALL, PAIRS), len(SMALL), min_counts={3: 2})
    assert _count(pruned, SMALL, "天风花", "雨水的") == 2 and _count(pruned, SMALL, "风花月", "水的月") == 0
    assert pruned.tables[3].entries < memory.tables[3].entries


def test_windows_with_unknown_characters_are_not_counted():
    memory = PhraseMemory.fit(_buckets(SMALL, [("天X", "风Y"), ("天风", "月雨")]), len(SMALL))  # X, Y: UNK
    assert memory.tables[2].entries == 1 and memory.tables[1].entries == 3  # 天→风, 天→月, 风→雨
    rows = memory.unigram_rows(_ids(SMALL, "天X"))
    assert np.isneginf(rows[:, [0, UNK]]).all()
    np.testing.assert_allclose(np.exp(rows[1]), memory.prior, rtol=1e-5)  # an unknown upper char: the prior
    line = memory.line(_ids(SMALL, "天X"))
    assert (line.window_log_probs(2, 1, _ids(SMALL, "风")[None, :], np.arange(2, len(SMALL))) == 0).all()


def test_unigram_rows_are_distributions_and_favour_what_was_seen():
    rows = MEMORY.unigram_rows(_ids(VOCAB, "天风花月"))
    np.testing.assert_allclose(np.exp(rows.astype(np.float64)).sum(axis=1), 1.0, rtol=1e-5)
    memory = PhraseMemory.fit(_buckets(SMALL, PAIRS), len(SMALL))
    row = memory.unigram_rows(_ids(SMALL, "天"))[0]
    assert row[SMALL.stoi["雨"]] == row.max() and row[SMALL.stoi["月"]] > row[SMALL.stoi["风"]]


def test_window_scores_follow_the_formula_and_paired_is_the_diagonal():
    memory = PhraseMemory.fit(_buckets(SMALL, PAIRS), len(SMALL))
    upper = _ids(SMALL, "天风花月")
    line = memory.line(upper)
    history = np.stack([_ids(SMALL, "雨水的天"), _ids(SMALL, "月花的风"), _ids(SMALL, "水雨月的")])
    cand = np.arange(2, len(SMALL))
    outer = line.window_log_probs(2, 1, history, cand)
    paired = line.window_log_probs(2, 1, history, history[:, 1], paired=True)
    np.testing.assert_allclose(paired, outer[np.arange(3), history[:, 1] - 2])
    uni = memory.unigram_rows(upper).astype(np.float64)
    b = math.exp(uni[0, SMALL.stoi["雨"]] + uni[1, SMALL.stoi["水"]])
    assert paired[0] == pytest.approx(math.log(2 + b) - math.log(3 + 1))  # c("天风" -> "雨水") = 2 of 3
    assert outer[0].argmax() + 2 == SMALL.stoi["水"]  # after 雨, the memory wants 水
    # trigrams need two characters before; position 1 has none to score
    assert (line.window_log_probs(3, 1, history, cand) == 0).all()


def test_file_round_trip_and_damage(tmp_path):
    path = tmp_path / "phrases.parquet"
    MEMORY.save(path)
    loaded = PhraseMemory.load(path, vocab_size=len(VOCAB))
    for n in (1, 2, 3):
        for name in ("up_keys", "starts", "low_keys", "counts"):
            np.testing.assert_array_equal(getattr(loaded.tables[n], name), getattr(MEMORY.tables[n], name))
    with pytest.raises(ValueError, match=r"vocabulary of \d+ characters, the model's has 3") as info:
        PhraseMemory.load(path, vocab_size=3)
    assert "\n" not in str(info.value)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"phrases\.parquet is damaged .*retrain") as info:
        PhraseMemory.load(path)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="missing"):
        PhraseMemory.load(tmp_path / "none.parquet")


# --------------------------------------------------------------------------- the search with the memory fused in


def _phrase_fused(lower: str, upper: str, lp: np.ndarray, vocab: Vocab, memory: PhraseMemory, weights) -> float:
    """model + uni·Σ log p1 + bi·Σ log p2 + tri·Σ log p3, window by window, from the module docstring's formula."""
    uni_w, bi_w, tri_w = weights
    up, low = _ids(vocab, upper), _ids(vocab, lower)
    rows = memory.unigram_rows(up).astype(np.float64)
    size = len(vocab)
    score = 0.0
    for i in range(len(lower)):
        if low[i] == UNK:
            continue
        score += float(lp[i, low[i]]) + uni_w * rows[i, low[i]]
        for n, w in ((2, bi_w), (3, tri_w)):
            if not w or i < n - 1:
                continue
            uw, lw = up[i - n + 1 : i + 1], low[i - n + 1 : i + 1]
            if (uw <= UNK).any() or (lw <= UNK).any():
                continue
            table = memory.tables[n]
            start, stop, total = table.row(int(sum(int(u) * size ** (n - 1 - k) for k, u in enumerate(uw))))
            seen = table.lookup(start, stop, np.array([sum(int(v) * size ** (n - 1 - k) for k, v in enumerate(lw))]))[0]
            backoff = math.exp(sum(rows[i - n + 1 + k, lw[k]] for k in range(n)))
            score += w * (math.log(seen + backoff) - math.log(total + 1.0))
    return score


def test_every_candidate_keeps_every_rule_with_phrases_fused():
    rng = np.random.default_rng(5)
    for _ in range(150):
        upper = _random_upper(rng, UPPER_CHARS, 8)
        lp = _log_probs(rng, len(upper), VOCAB)
        weights = tuple(float(w) for w in rng.choice([0.0, 0.5, 1.0, 2.0], size=3))
        options = DecodeOptions(tone=bool(rng.random() < 0.5))
        top_k = int(rng.integers(1, 5))
        res = beam_decode(upper, lp, VOCAB, top_k=top_k, options=options, phrases=MEMORY, phrase_weights=weights,
                          beam_size=int(rng.integers(1, 9)))
        assert res.relaxed == []
        scores = [score for _, score in res.candidates]
        assert scores == sorted(scores, reverse=True) and len({c for c, _ in res.candidates}) == len(scores)
        for lower, score in res.candidates:
            assert _satisfies(upper, lower, options), (upper, lower)
            assert score == pytest.approx(_phrase_fused(lower, upper, lp, VOCAB, MEMORY, weights), abs=1e-3)
        exact_best = decode(upper, lp, VOCAB, options=options).candidates[0][0]
        assert scores[0] >= _phrase_fused(exact_best, upper, lp, VOCAB, MEMORY, weights) - 1e-4


def test_only_unigrams_is_the_exact_search_over_the_summed_rows():
    rng = np.random.default_rng(9)
    for _ in range(40):
        upper = _random_upper(rng, UPPER_CHARS, 7)
        lp = _log_probs(rng, len(upper), VOCAB)
        res = beam_decode(upper, lp, VOCAB, top_k=3, phrases=MEMORY, phrase_weights=(0.7, 0.0, 0.0))
        summed = lp + 0.7 * MEMORY.unigram_rows(_ids(VOCAB, upper))
        assert res.candidates == decode(upper, summed, VOCAB, top_k=3).candidates


def test_a_line_whose_ngrams_faced_nothing_is_answered_exactly_with_their_back_off_in_the_rows():
    memory = PhraseMemory.fit(_buckets(SMALL, PAIRS), len(SMALL))
    upper = "月天雨"  # no bigram or trigram of it was counted: only the separable back-off remains
    line = memory.line(_ids(SMALL, upper))
    assert all(not len(window.keys) for window in line.windows.values())
    lp = _log_probs(np.random.default_rng(3), len(upper), SMALL)
    weights = (0.5, 1.0, 1.0)
    res = beam_decode(upper, lp, SMALL, top_k=2, phrases=memory, phrase_weights=weights)
    rows = line.with_separable(lp, {1: 0.5, 2: 1.0, 3: 1.0})
    assert res.candidates == decode(upper, rows, SMALL, top_k=2).candidates
    for lower, score in res.candidates:
        assert score == pytest.approx(_phrase_fused(lower, upper, lp, SMALL, memory, weights), abs=1e-4)


def test_a_large_beam_finds_the_brute_force_optimum_with_phrases():
    rng = np.random.default_rng(13)
    for _ in range(60):
        upper = _random_upper(rng, "天月风雨，的", 4)
        options = DecodeOptions(**{name: bool(rng.random() < 0.7) for name in
                                   ("no_copy", "punctuation", "repetition", "tone", "no_reuse")})
        lp = _log_probs(rng, len(upper), SMALL)
        weights = (float(rng.choice([0.0, 1.0])), float(rng.choice([0.5, 2.0])), float(rng.choice([0.0, 1.0])))
        choices = [[u] if options.punctuation and u in "，" else SMALL.itos[2:] for u in upper]
        lines = ["".join(c) for c in itertools.product(*choices)]
        scored = sorted(((line, _phrase_fused(line, upper, lp, SMALL, SMALL_MEMORY, weights)) for line in lines
                         if _satisfies(upper, line, options)), key=lambda item: -item[1])
        res = beam_decode(upper, lp, SMALL, top_k=1, options=options, phrases=SMALL_MEMORY, phrase_weights=weights,
                          beam_size=10_000)
        if not scored:
            assert res.relaxed
            continue
        assert res.candidates[0][1] == pytest.approx(scored[0][1], abs=1e-3), (upper, res.candidates, scored[:2])


def test_mismatched_memory_or_negative_weight_is_refused():
    lp = _log_probs(np.random.default_rng(0), 2, VOCAB)
    with pytest.raises(ValueError, match="phrase memory has a vocabulary"):
        beam_decode("天风", lp, VOCAB, phrases=SMALL_MEMORY, phrase_weights=(1.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="fusion weights must be >= 0"):
        beam_decode("天风", lp, VOCAB, phrases=MEMORY, phrase_weights=(1.0, -1.0, 0.0))
    assert PAD_TOKEN and UNK_TOKEN  # the vocabularies above keep them at 0 and 1
