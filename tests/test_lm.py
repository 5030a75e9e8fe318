"""The lower-line bigram LM: proper distributions, the interpolation formula, files that fail in one line."""

from __future__ import annotations

import time

import numpy as np
import pytest

from couplet.decoding.lm import CharBigramLM
from couplet.data.vocab import PAD, PAD_TOKEN, UNK, UNK_TOKEN, Vocab

VOCAB = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *"天风花月雨水山云，。"])
LINES = ["天风花月", "山水云", "花月天风", "月，雨水", "天风雨X", "X山 水"]  # X is outside the vocabulary
S = VOCAB.stoi


@pytest.fixture(scope="module")
def lm() -> CharBigramLM:
    return CharBigramLM.fit(LINES, VOCAB)


def _counts(lines: list[str]) -> tuple[dict[tuple[int | None, int], int], dict[int, int]]:
    """Bigram and unigram counts written out by hand (None = line start; nothing counted into UNK)."""
    bigrams: dict[tuple[int | None, int], int] = {}
    unigrams: dict[int, int] = {}
    for line in lines:
        prev = None
        for ch in line.replace(" ", ""):
            cur = S.get(ch, UNK)
            if cur != UNK:
                bigrams[(prev, cur)] = bigrams.get((prev, cur), 0) + 1
                unigrams[cur] = unigrams.get(cur, 0) + 1
            prev = cur
    return bigrams, unigrams


def test_rows_are_distributions_over_the_emittable_characters(lm):
    for prev in [None, PAD, UNK, *range(2, len(VOCAB))]:
        row = lm.next_log_probs(prev)
        assert row.dtype == np.float32 and row.shape == (len(VOCAB),)
        assert row[PAD] == -np.inf and row[UNK] == -np.inf
        assert np.all(np.isfinite(row[2:]))
        assert np.exp(row[2:].astype(np.float64)).sum() == pytest.approx(1.0, abs=1e-5)


def test_probabilities_follow_the_interpolation_formula(lm):
    bigrams, unigrams = _counts(LINES)
    n_tokens, n_emittable = sum(unigrams.values()), len(VOCAB) - 2
    lam = lm.interpolation
    for prev in [None, UNK, *range(2, len(VOCAB))]:
        c_prev = sum(n for (a, _), n in bigrams.items() if a == prev)
        row = lm.next_log_probs(prev)
        for b in range(2, len(VOCAB)):
            p_uni = (unigrams.get(b, 0) + 1) / (n_tokens + n_emittable)
            expected = lam * bigrams.get((prev, b), 0) / c_prev + (1 - lam) * p_uni if c_prev else p_uni
            assert float(row[b]) == pytest.approx(np.log(expected), abs=1e-5)


def test_seen_bigrams_beat_unseen_ones_and_line_order_matters(lm):
    tian = lm.next_log_probs(S["天"])
    assert tian[S["风"]] > tian[S["云"]]  # 天风 seen three times, 天云 never
    assert lm.next_log_probs(None)[S["天"]] > lm.next_log_probs(None)[S["云"]]  # lines start with 天, never 云
    assert lm.line_log_prob("天风花月", VOCAB) > lm.line_log_prob("月花风天", VOCAB)


def test_pair_lookups_and_line_sums_agree_with_the_rows(lm):
    rng = np.random.default_rng(0)
    prev = rng.integers(0, len(VOCAB) + 1, size=200)  # len(VOCAB) = line start
    nxt = rng.integers(2, len(VOCAB), size=200)
    rows = np.stack([lm.next_log_probs(None if p == lm.bos else int(p)) for p in prev])
    assert lm.pair_log_probs(prev, nxt) == pytest.approx(rows[np.arange(200), nxt], abs=1e-5)
    line = "花月天风"
    expected, state = 0.0, None
    for ch in line:
        expected += float(lm.next_log_probs(state)[S[ch]])
        state = S[ch]
    assert lm.line_log_prob(line, VOCAB) == pytest.approx(expected, abs=1e-5)
    # an unknown character adds nothing and conditions the next one as UNK
    assert lm.line_log_prob("天X风", VOCAB) == pytest.approx(
        float(lm.next_log_probs(None)[S["天"]] + lm.next_log_probs(UNK)[S["风"]]), abs=1e-5
    )


def test_unknown_characters_and_whitespace(lm):
    assert lm.unigram[UNK] == 0  # transitions into UNK are not counted ...
    assert lm.next_log_probs(UNK)[S["山"]] > lm.next_log_probs(UNK)[S["月"]]  # ... transitions out of it are (X山)
    spaced = CharBigramLM.fit(["山 水\u3000云"], VOCAB)
    plain = CharBigramLM.fit(["山水云"], VOCAB)
    assert (spaced.counts != plain.counts).nnz == 0
    empty = CharBigramLM.fit([], VOCAB)  # no data: the uniform distribution
    assert np.exp(empty.next_log_probs(None)[2:]) == pytest.approx(np.full(len(VOCAB) - 2, 1 / (len(VOCAB) - 2)))


def test_counts_are_sparse_int32():
    lm = CharBigramLM.fit(LINES, VOCAB)
    assert lm.counts.format == "csr" and lm.counts.shape == (len(VOCAB) + 1, len(VOCAB))
    assert lm.counts.indices.dtype == np.int32 and lm.counts.indptr.dtype == np.int32
    with pytest.raises(ValueError):
        CharBigramLM.fit(LINES, VOCAB, interpolation=1.0)


def test_save_load_round_trip(lm, tmp_path):
    path = tmp_path / "model" / "lm.npz"
    lm.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["lm.npz"]  # no temporary left behind
    back = CharBigramLM.load(path, vocab_size=len(VOCAB))
    assert back.vocab_size == lm.vocab_size and back.interpolation == lm.interpolation
    assert (back.counts != lm.counts).nnz == 0
    assert np.array_equal(back.unigram, lm.unigram)
    for prev in [None, UNK, *range(2, len(VOCAB))]:
        assert np.array_equal(back.next_log_probs(prev), lm.next_log_probs(prev))


def _one_line_error(path, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        CharBigramLM.load(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_damaged_missing_and_foreign_files_fail_in_one_line(lm, tmp_path):
    path = tmp_path / "lm.npz"
    lm.save(path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 10, 0):
        path.write_bytes(data[:cut])
        assert "damaged" in _one_line_error(path) and "retrain" in _one_line_error(path)
    path.write_bytes(b"not a zip file at all" * 10)
    assert "damaged" in _one_line_error(path)
    np.savez(path, something=np.zeros(3))  # a valid .npz of something else
    assert "damaged" in _one_line_error(path)
    assert "missing" in _one_line_error(tmp_path / "absent.npz")


def test_vocabulary_size_mismatch_is_one_line(lm, tmp_path):
    path = tmp_path / "lm.npz"
    lm.save(path)
    message = _one_line_error(path, vocab_size=len(VOCAB) + 5)
    assert str(len(VOCAB)) in message and str(len(VOCAB) + 5) in message
    with pytest.raises(ValueError):
        lm.line_log_prob("天风", Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *"天风"]))


def test_fit_on_240k_lines_is_fast():
    rng = np.random.default_rng(1)
    chars = [chr(0x4E00 + i) for i in range(6000)]
    vocab = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *chars[:5800]])  # some characters fall outside
    codes = rng.zipf(1.3, size=(240_000, 7)) % 6000
    lengths = rng.integers(5, 8, size=240_000)
    lines = ["".join(chars[c] for c in row[:n]) for row, n in zip(codes.tolist(), lengths.tolist())]
    start = time.perf_counter()
    lm = CharBigramLM.fit(lines, vocab)
    assert time.perf_counter() - start < 5.0
    assert lm.counts.sum() == lm.unigram.sum() > 0  # every counted character is one bigram
    assert lm.counts[lm.bos].sum() <= len(lines)  # one line start per line (fewer when it is unknown)
