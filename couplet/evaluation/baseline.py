"""The per-character dictionary baseline: what a lookup table answers, scored exactly like a model.

For each upper character, the lower character most often aligned with it (same position) in a
build's train split, never the character itself (punctuation excepted: a mark is aligned with a
mark). Evaluation reports it beside every model (couplet.evaluation.evaluate), so a model that has not learnt
more than a lookup table shows it.

`DictionaryBaseline` is a `Predictor` whose `log_probs` come from the counts instead of a network,
so `evaluate_pairs` decodes it with the same constrained decoder and options as a model. The
distribution of the lower character at a position with upper character u is

    p(l | u) ∝ count(u, l) + q(l),   l != u, never PAD/UNK,

where q is the train split's lower-character frequency (add-one smoothed, so every character has
some probability and the decoder's constraints always find a legal line) and sums to 1: a pseudo
count of one spread over the characters, less than any difference between two counts, so the
arg-max is the most frequent aligned character (q breaks ties). An upper character never seen in
train (or outside the vocabulary, UNK) has no counts and falls back to q. Impossible entries (the
same character, PAD, UNK) get log-probability `FLOOR` rather than -inf: finite, like a network's,
since the decoder adds rows together (the constraints still exclude them outright).

    baseline = DictionaryBaseline.from_build(build_dir)       # ~1 s on 242k couplets
    baseline.lookup("山")                                      # -> "水": the dictionary's entry
    metrics, predictions = evaluate_pairs(baseline, uppers, references)
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from couplet.core.config import Config
from couplet.data.batches import load_split
from couplet.data.build import read_build_vocab
from couplet.predictor import InputError, Predictor
from couplet.data.punct import is_punct
from couplet.data.vocab import PAD, UNK, Vocab

BASELINE_ID = "dictionary-baseline"
FLOOR = -100.0  # log-probability of what the dictionary never answers (any smoothed entry is above -30)


def _per_character(vocab: Vocab, lines: Sequence[str], direction: str, rows) -> np.ndarray:
    """(B, L, V) float32 for equally long lines from `rows(upper_ids) -> (n, V)`, one row per distinct character."""
    if direction != "down":
        raise InputError(f"the baselines answer upper → lower only (direction 'down'), got {direction!r}")
    if not lines:
        return np.zeros((0, 0, len(vocab)), dtype=np.float32)
    ids = np.array([[vocab.stoi.get(ch, UNK) for ch in line] for line in lines], dtype=np.int64)
    unique, inverse = np.unique(ids, return_inverse=True)
    return rows(unique)[inverse.reshape(ids.shape)]


class DictionaryBaseline(Predictor):
    """Aligned (upper, lower) character counts of a train split, answering like a model."""

    def __init__(self, pairs: np.ndarray, counts: np.ndarray, prior: np.ndarray, vocab: Vocab, config: Config | None = None):
        """`pairs`: sorted codes upper_id * V + lower_id (same-character pairs already left out),
        `counts`: how often each occurred; `prior`: q, the (V,) lower-character frequency."""
        super().__init__(None, vocab, config, model_id=BASELINE_ID)
        size = len(vocab)
        self._lower = (pairs % size).astype(np.intp)
        self._count = counts.astype(np.float32)
        self._start = np.searchsorted(pairs // size, np.arange(size + 1))  # row u: [start[u], start[u + 1])
        self._prior = prior.astype(np.float32)

    @classmethod
    def from_build(cls, build_dir: str | Path, config: Config | None = None) -> "DictionaryBaseline":
        """Count the aligned character pairs of `build_dir`'s train shards (ids of its vocabulary)."""
        vocab = read_build_vocab(build_dir)
        size = len(vocab)
        buckets = load_split(build_dir, "train").values()
        up = np.concatenate([u.ravel() for u, _ in buckets]) if buckets else np.zeros(0, np.int64)
        down = np.concatenate([d.ravel() for _, d in buckets]) if buckets else np.zeros(0, np.int64)
        punct = np.array([is_punct(ch) for ch in vocab.itos], dtype=bool)
        known = (up > UNK) & (down > UNK)
        keep = known & ((up != down) | punct[up])
        pairs, counts = np.unique(up[keep] * size + down[keep], return_counts=True)
        prior = np.bincount(down[down > UNK], minlength=size).astype(np.float64) + 1.0
        prior[[PAD, UNK]] = 0.0
        return cls(pairs, counts, prior / prior.sum(), vocab, config)

    def rows(self, upper_ids: np.ndarray) -> np.ndarray:
        """(len(upper_ids), V) float32 log-probabilities of the lower character for each upper id."""
        out = np.tile(self._prior, (len(upper_ids), 1))
        for r, u in enumerate(upper_ids.tolist()):
            lo, hi = self._start[u], self._start[u + 1]
            out[r, self._lower[lo:hi]] += self._count[lo:hi]
            if u > UNK and not is_punct(self.vocab.itos[u]):
                out[r, u] = 0.0  # never the same character (already absent from the counts)
        with np.errstate(divide="ignore"):
            return np.maximum(np.log(out / out.sum(axis=1, keepdims=True)), np.float32(FLOOR))

    def log_probs(self, lines: Sequence[str], direction: str = "down") -> np.ndarray:
        """(B, L, V) float32 log-probabilities for equally long, already prepared lines (upper → lower only)."""
        return _per_character(self.vocab, lines, direction, self.rows)

    def lookup(self, upper: str) -> str | None:
        """The dictionary's entry for one character: its most frequent aligned lower character in
        train (not itself), or None if it was never seen as an upper character."""
        u = self.vocab.stoi.get(upper, UNK)
        lo, hi = self._start[u], self._start[u + 1]
        if u <= UNK or lo == hi:
            return None
        lower = self._lower[lo:hi]
        return self.vocab.itos[int(lower[np.argmax(self._count[lo:hi] + self._prior[lower])])]  # q breaks ties


PHRASE_BASELINE_ID = "phrase-baseline"
PHRASE_BASELINE_WEIGHTS = (1.0, 0.5)  # bigrams, trigrams: the baseline's when nothing was chosen on valid


class PhraseBaseline(Predictor):
    """The aligned phrase memory alone, no network: the unigram table's log p1(lower | upper) as the rows, its bigrams and
    trigrams fused in by the same beam search as a model's (decode.phrase_bi / phrase_tri; phrase_uni stays 0, the
    rows being the unigrams already). The floor a model must beat (promotion, the run summary)."""

    def __init__(self, memory, vocab: Vocab, config: Config | None = None,
                 weights: tuple[float, float] = PHRASE_BASELINE_WEIGHTS):
        from couplet.decoding.settings import DecodeSettings

        super().__init__(None, vocab, config, model_id=PHRASE_BASELINE_ID)
        if memory.vocab_size != len(vocab):
            raise ValueError(f"the phrase memory has {memory.vocab_size} characters, the vocabulary {len(vocab)}")
        self.memory = memory
        decode = self.config.decode.model_copy(update={"phrase_uni": 0.0, "phrase_bi": weights[0], "phrase_tri": weights[1],
                                                       "lm_weight": 0.0})
        self.config = self.config.model_copy(update={"decode": decode})
        self.decoding = DecodeSettings(decode, None, memory)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, vocab: Vocab, config: Config | None = None) -> "PhraseBaseline":
        """The baseline of a model folder's phrases.parquet (the train split it was trained on)."""
        from couplet.core.catalog import MODEL_FILES
        from couplet.decoding.phrases import PhraseMemory

        return cls(PhraseMemory.load(Path(model_dir) / MODEL_FILES.phrases, vocab_size=len(vocab)), vocab, config)

    def log_probs(self, lines: Sequence[str], direction: str = "down") -> np.ndarray:
        """(B, L, V) float32: each position's log p1(lower char | upper char), floored at FLOOR like the dictionary's."""
        return _per_character(self.vocab, lines, direction,
                              lambda ids: np.maximum(self.memory.unigram_rows(ids), np.float32(FLOOR)))
