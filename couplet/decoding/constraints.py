"""The couplet rules both searches enforce (`couplet.decoding.decode`, exact; `couplet.decoding.beam`, fused).

The labeller gives, for every character of the upper line (上联), a distribution over the
character at the same position of the lower line (下联). A search turns that (L, V) matrix
into the k best whole lines under a switchable set of couplet constraints:

- always: PAD and UNK are never emitted;
- `no_copy`: lower[i] != upper[i] (the seed's prior; punctuation positions excepted when
  `punctuation` is on, since a mark is copied there);
- `no_reuse` (不重字): no ideograph of the upper line appears anywhere in the lower line (every
  free group's row masks the ids of all the upper line's ideographs; punctuation is not an ideograph);
- `punctuation`: a punctuation position gets the same mark, other positions never get one;
- `repetition`: upper[i] == upper[j]  <=>  lower[i] == lower[j]. Positions are grouped by
  their upper character; a group gets one lower character, scored by the sum of its
  positions' log-probabilities, and different groups get different characters;
- `tone`: if the upper line ends in a 仄 (oblique) tone, the lower line's final character
  must be 平 (level). Tones come from pypinyin `Style.TONE3` (1-2 = 平, 3-4 = 仄); a
  character whose tone cannot be determined is not allowed there.

`plan_groups` turns a line and its log-probabilities into groups with every requested rule applied
as -inf masks; `search_relaxing` drops rules (tone, repetition, punctuation, no-copy, no-reuse) while a search
finds nothing. The tone helpers are also what `couplet.evaluation.metrics` scores with.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Callable

import numpy as np

from couplet.data.punct import is_ideograph, is_punct
from couplet.data.vocab import PAD, UNK, Vocab

__all__ = [
    "PING",
    "ZE",
    "ARGMAX",
    "CONSTRAINED",
    "DecodeOptions",
    "DecodeResult",
    "GroupPlan",
    "VocabTables",
    "char_tone",
    "checked_log_probs",
    "final_position",
    "final_tone",
    "plan_groups",
    "search_relaxing",
    "vocab_tables",
]

PING, ZE = "平", "仄"
NEG_INF = -np.inf


# --------------------------------------------------------------------------- tones


@lru_cache(maxsize=1 << 16)
def char_tone(ch: str) -> str | None:
    """'平' (tones 1-2), '仄' (tones 3-4) or None (neutral tone, unknown, not a Han character).

    Uses the character's default (most common) reading in pypinyin, read in isolation, so that
    the decoder (which chooses characters one group at a time) and the metrics agree.
    """
    if len(ch) != 1 or is_punct(ch) or ch.isspace():
        return None
    from pypinyin import Style, pinyin

    reading = pinyin(ch, style=Style.TONE3, heteronym=False, errors="ignore")
    if not reading or not reading[0] or not reading[0][0]:
        return None
    last = reading[0][0][-1]
    if last in "12":
        return PING
    if last in "34":
        return ZE
    return None


def final_position(line: str) -> int | None:
    """Index of the line's last non-punctuation character (None if there is none)."""
    for i in range(len(line) - 1, -1, -1):
        if not is_punct(line[i]):
            return i
    return None


def final_tone(line: str) -> str | None:
    """Tone class of the line's final (non-punctuation) character."""
    pos = final_position(line)
    return None if pos is None else char_tone(line[pos])


# --------------------------------------------------------------------------- options / results


@dataclass(frozen=True)
class DecodeOptions:
    """Which couplet constraints the decoder enforces (PAD/UNK are always excluded)."""

    no_copy: bool = True
    punctuation: bool = True
    repetition: bool = True
    tone: bool = False
    no_reuse: bool = True  # 不重字: no ideograph of the upper line anywhere in the lower line
    # what a writer asks beyond the rules (couplet.decoding.studio): characters forced at positions (never relaxed),
    # single characters never emitted (the blocklist's one-character words), and the reverse direction, where the
    # given line is a lower line and the tone rule is mirrored (it ends 平 -> the answer must end 仄)
    pins: tuple[tuple[int, str], ...] = ()
    banned: frozenset[str] = frozenset()
    mirror: bool = False

    @classmethod
    def from_flags(cls, constrained: bool = True, tone: bool = False, no_reuse: bool = True) -> "DecodeOptions":
        """`constrained` switches no-copy, punctuation and repetition together, and no-reuse with them when `no_reuse`
        (a model folder's `decode.no_reuse`); `tone` is separate."""
        return cls(no_copy=constrained, punctuation=constrained, repetition=constrained, tone=tone,
                   no_reuse=constrained and no_reuse)

    def names(self) -> list[str]:
        return [name for name in ("no_copy", "punctuation", "repetition", "tone", "no_reuse") if getattr(self, name)]


ARGMAX = DecodeOptions(no_copy=False, punctuation=False, repetition=False, tone=False, no_reuse=False)
CONSTRAINED = DecodeOptions()


@dataclass
class DecodeResult:
    candidates: list[tuple[str, float]]  # (lower line, total log-probability), best first
    constraints: list[str]  # constraints actually enforced on this line
    relaxed: list[str] = field(default_factory=list)  # requested but dropped: no assignment satisfied them


# --------------------------------------------------------------------------- per-vocabulary tables


class VocabTables:
    """What the constraints need of a vocabulary, computed once per Vocab object (see `vocab_tables`)."""

    def __init__(self, vocab: Vocab) -> None:
        self.itos = vocab.itos
        self.stoi = vocab.stoi
        self.size = len(vocab)
        self.punct_ids = np.array(
            [i for i, ch in enumerate(vocab.itos) if i not in (PAD, UNK) and is_punct(ch)], dtype=np.intp
        )
        # the columns every row masks (PAD/UNK, plus the punctuation ids when the punctuation rule is on)
        self.always_masked = np.array([PAD, UNK], dtype=np.intp)
        self.always_masked_punct = np.concatenate([self.always_masked, self.punct_ids])
        self._ping_penalty: np.ndarray | None = None
        self._ze_penalty: np.ndarray | None = None
        # the ideographs' ids (no_reuse masks those of the upper line): one dict lookup per character on the hot path
        self.ideograph_ids: dict[str, int] = {
            ch: i for i, ch in enumerate(vocab.itos) if i not in (PAD, UNK) and len(ch) == 1 and is_ideograph(ch)
        }

    @property
    def ping_penalty(self) -> np.ndarray:
        """0 for 平-tone characters, -inf for the rest (computed on first use, ~0.1 s per 6k chars)."""
        if self._ping_penalty is None:
            ping = np.array([char_tone(ch) == PING for ch in self.itos], dtype=bool)
            ping[[PAD, UNK]] = False
            self._ping_penalty = np.where(ping, 0.0, NEG_INF).astype(np.float32)
        return self._ping_penalty

    @property
    def ze_penalty(self) -> np.ndarray:
        """0 for 仄-tone characters, -inf for the rest: the mirrored tone rule's mask."""
        if self._ze_penalty is None:
            ze = np.array([char_tone(ch) == ZE for ch in self.itos], dtype=bool)
            ze[[PAD, UNK]] = False
            self._ze_penalty = np.where(ze, 0.0, NEG_INF).astype(np.float32)
        return self._ze_penalty


_TABLES: dict[int, tuple[weakref.ref, VocabTables]] = {}


def vocab_tables(vocab: Vocab) -> VocabTables:
    """The tables of `vocab`, cached while the Vocab object lives."""
    entry = _TABLES.get(id(vocab))
    if entry is not None and entry[0]() is vocab and entry[1].size == len(vocab):
        return entry[1]
    tables = VocabTables(vocab)
    key = id(vocab)
    _TABLES[key] = (weakref.ref(vocab, lambda _ref, key=key: _TABLES.pop(key, None)), tables)
    return tables


# --------------------------------------------------------------------------- groups and masks


@dataclass
class GroupPlan:
    """A line's repetition groups and their masked score rows: the constraint setup of `decode.decode` and
    `beam.beam_decode` (one place, so the two searches enforce the same rules)."""

    group_of: list[int]  # position -> group
    fixed: dict[int, str]  # group -> punctuation mark copied there
    scores: np.ndarray  # (groups, V): summed log-probs of the group's positions, disallowed = -inf
    distinct: bool  # different free groups must get different characters
    applied: list[str]  # constraints enforced on this line ("tone" only where it applied)


def _sum_positions(lp: np.ndarray, group_of: list[int], n_groups: int, dtype) -> np.ndarray:
    """Each group's row: the sum of its positions' rows, position by position in position order, in `dtype`."""
    scores = np.zeros((n_groups, lp.shape[1]), dtype=dtype)
    for i, g in enumerate(group_of):
        scores[g] += lp[i]
    return scores


def plan_groups(
    upper: str, lp: np.ndarray, tables: VocabTables, options: DecodeOptions, dtype=np.float32
) -> GroupPlan:
    """Groups of `upper` and their score rows with every constraint of `options` applied as masks.

    `repetition` groups positions by upper character (else each position is its own group); a
    group's row sums its positions' log-probabilities. PAD/UNK are -inf everywhere; `punctuation`
    fixes punctuation groups to their mark and masks every punctuation id (fixed rows are left as
    they are: callers skip them); `no_copy` masks the group's own upper character (not in fixed
    groups); `no_reuse` masks the ids of every ideograph of `upper` in every row (fixed rows too, which callers
    skip; a mark is no ideograph, so a copied mark is never masked); `tone` keeps only 平 ids in the final position's group when the upper line ends 仄.

    `dtype` is how groups are summed. float32 (decode's hot path): one matmul of a float32 0/1
    membership matrix with `lp`, whose result follows `lp`'s dtype (float64 log-probs give float64
    sums; where `lp` holds -inf, 0 * -inf would make NaN, so such a line is summed row by row, in `lp`'s
    dtype). Any other dtype (the beam's float64): row by row, in position order, in that dtype. A line
    without repeats is `lp` copied as `dtype` either way. `scores` is a new array the caller owns.
    """
    applied: list[str] = []
    if options.repetition:
        index: dict[str, int] = {}
        group_of = [index.setdefault(ch, len(index)) for ch in upper]
        group_chars = list(index)
    else:
        group_of = list(range(len(upper)))
        group_chars = list(upper)
    n_groups, length = len(group_chars), len(group_of)
    if n_groups == length:  # groups are the positions, in order: nothing to add
        scores = np.array(lp, dtype=dtype, copy=True)
    elif dtype is np.float32 or np.dtype(dtype) == np.float32:  # `is` first: ~1 us on the hot path
        member = np.zeros((n_groups, length), dtype=np.float32)
        member[group_of, np.arange(length)] = 1.0
        with np.errstate(invalid="ignore"):
            scores = member @ lp
        if np.isnan(scores).any():  # 0 * -inf: a masked entry of one position would spoil every other group's row
            scores = _sum_positions(lp, group_of, n_groups, lp.dtype)
    else:
        scores = _sum_positions(lp, group_of, n_groups, dtype)
    # the columns masked in every row, set in one fancy-indexed assignment: PAD/UNK, punctuation, the upper's ideographs
    columns = tables.always_masked
    fixed: dict[int, str] = {}
    if options.punctuation:
        applied.append("punctuation")
        for g, ch in enumerate(group_chars):
            if is_punct(ch):
                fixed[g] = ch
        columns = tables.always_masked_punct
    reused: dict[str, int] = {}
    if options.no_reuse:
        ideograph_ids = tables.ideograph_ids
        reused = {ch: ideograph_ids[ch] for ch in group_chars if ch in ideograph_ids}
        if reused:
            columns = np.concatenate([columns, np.fromiter(reused.values(), dtype=np.intp, count=len(reused))])
    scores[:, columns] = NEG_INF
    if options.no_copy:
        applied.append("no_copy")
        stoi = tables.stoi
        for g, ch in enumerate(group_chars):
            if g not in fixed and ch not in reused:  # a reused ideograph's column is masked already
                uid = stoi.get(ch)
                if uid is not None:
                    scores[g, uid] = NEG_INF
    if options.no_reuse:
        applied.append("no_reuse")
    if options.repetition:
        applied.append("repetition")
    if options.tone and final_tone(upper) == (PING if options.mirror else ZE):
        g = group_of[final_position(upper)]
        if g not in fixed:
            scores[g] += tables.ze_penalty if options.mirror else tables.ping_penalty
            applied.append("tone")
    if options.banned:
        banned = [tables.stoi[ch] for ch in options.banned if ch in tables.stoi]
        if banned:
            scores[:, banned] = NEG_INF
    for position, ch in options.pins:  # a pin keeps its character's score (-inf if a rule forbids it) and nothing else
        g = group_of[position]
        uid = tables.stoi.get(ch)
        if g in fixed or uid is None:
            continue  # refused before the search (couplet.decoding.studio.check_pins)
        kept = scores[g, uid]
        scores[g] = NEG_INF
        scores[g, uid] = kept
    n_free = len(group_chars) - len(fixed)
    return GroupPlan(group_of, fixed, scores, options.repetition and n_free > 1, applied)


def checked_log_probs(upper: str, log_probs: np.ndarray, vocab: Vocab) -> np.ndarray:
    """`log_probs` as an array of the line's rows; a ValueError unless its shape is (>= len(upper), len(vocab))."""
    lp = np.asarray(log_probs)
    if lp.ndim != 2 or lp.shape[0] < len(upper) or lp.shape[1] != len(vocab):
        raise ValueError(
            f"log_probs must have shape (>= {len(upper)}, {len(vocab)}) for this line and vocabulary, got {lp.shape}"
        )
    return lp[: len(upper)]


# --------------------------------------------------------------------------- relaxing


RELAX_ORDER = ("tone", "repetition", "punctuation", "no_copy", "no_reuse")  # the order constraints are dropped in


def search_relaxing(
    options: DecodeOptions, attempt: Callable[[DecodeOptions], tuple[list[tuple[str, float]], list[str]]]
) -> DecodeResult:
    """`attempt(options) -> (candidates, constraints applied)`, retried with constraints dropped in `RELAX_ORDER`
    while it finds nothing; the dropped ones are listed in `DecodeResult.relaxed`."""
    relaxed: list[str] = []
    current = options
    while True:
        candidates, applied = attempt(current)
        if candidates:
            return DecodeResult(candidates=candidates, constraints=applied, relaxed=relaxed)
        still_on = [name for name in RELAX_ORDER if getattr(current, name)]
        if not still_on:
            return DecodeResult(candidates=[], constraints=applied, relaxed=relaxed)
        relaxed.append(still_on[0])
        current = replace(current, **{still_on[0]: False})

