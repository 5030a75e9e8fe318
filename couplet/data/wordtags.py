"""jieba word tags of a line, per character (issue 20, item 5c): the one owner of the jieba part-of-speech rules.

`pos_words(line)` is jieba.posseg's segmentation and tags of a line (no HMM), `pos_class(tag)` the coarse class of a
tag. Evaluation's POS-parallelism measure (couplet/evaluation/metrics.py) and the labeller's word features
(model.word_features) both read them here.

`line_tags(line)` gives each character one small integer, its word tag:
- 0 is PAD (never a character's);
- 1 is punctuation (`couplet.data.punct.is_punct`), whatever jieba says;
- otherwise 2 + boundary * len(POS_CLASSES) + class: the character's place in its jieba word (B begin, M middle,
  E end, S a one-character word) and the coarse class of that word's tag.
The build stores them for both lines of every pair (`up_tags`, `down_tags`); the model adds a learnt embedding of
them to the character embedding; at inference they are computed from the input line the same way
(`tag_matrix`), so training and answering see the same features. 30-50 µs a 7-character line, nearly all of
it jieba's own cut (on a shared 2-core box).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Sequence

import numpy as np

from couplet.data.punct import is_punct

_JIEBA = None
_POSSEG = None


def jieba_module():
    """jieba, initialised once per process (quietly)."""
    global _JIEBA
    if _JIEBA is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()
        _JIEBA = jieba
    return _JIEBA


def posseg_module():
    """jieba.posseg, with jieba initialised."""
    global _POSSEG
    if _POSSEG is None:
        jieba_module()
        import jieba.posseg

        _POSSEG = jieba.posseg
    return _POSSEG


NOUN, VERB, ADJ, ADV, NUM, PRON, OTHER = "noun", "verb", "adj", "adv", "num", "pron", "other"
POS_CLASSES = (NOUN, VERB, ADJ, ADV, NUM, PRON, OTHER)


def pos_class(tag: str) -> str:
    """Coarse class of a jieba (ICTCLAS-style) part-of-speech tag."""
    head = tag[:1]
    if head == "n" or tag in ("t", "s", "f", "tg"):
        return NOUN
    if head == "v":
        return VERB
    if head == "a":
        return ADJ
    if tag == "d":
        return ADV
    if head == "m" or tag == "q":
        return NUM
    if head == "r":
        return PRON
    return OTHER


def _pos_words(line: str) -> tuple[tuple[int, int, str], ...]:
    out = []
    pos = 0
    for pair in posseg_module().cut(line, HMM=False):
        end = pos + len(pair.word)
        out.append((pos, end, pair.flag))
        pos = end
    return tuple(out)


@lru_cache(maxsize=1 << 17)
def pos_words(line: str) -> tuple[tuple[int, int, str], ...]:
    """(start, end, tag) of each word of `line` under jieba.posseg, without its HMM (cached per line)."""
    return _pos_words(line)


PAD_TAG, PUNCT_TAG = 0, 1
BOUNDARIES = ("B", "M", "E", "S")
N_TAGS = 2 + len(BOUNDARIES) * len(POS_CLASSES)  # the size of the model's tag embedding
_CLASS_INDEX = {name: i for i, name in enumerate(POS_CLASSES)}


def word_tag(boundary: str, cls: str) -> int:
    """The tag of a character at `boundary` (B, M, E, S) of a word of coarse class `cls`."""
    return 2 + BOUNDARIES.index(boundary) * len(POS_CLASSES) + _CLASS_INDEX[cls]


_B, _M, _E, _S = (2 + i * len(POS_CLASSES) for i in range(len(BOUNDARIES)))


def _tags(line: str, words: Sequence[tuple[int, int, str]]) -> list[int]:
    tags = [_S + _CLASS_INDEX[OTHER]] * len(line)  # a character jieba did not account for (never seen): other, alone
    for start, end, flag in words:
        cls = _CLASS_INDEX[pos_class(flag)]
        if end - start == 1:
            tags[start] = _S + cls
        else:
            tags[start] = _B + cls
            for i in range(start + 1, end - 1):
                tags[i] = _M + cls
            tags[end - 1] = _E + cls
    for i, ch in enumerate(line):
        if is_punct(ch):
            tags[i] = PUNCT_TAG
    return tags[: len(line)]


def line_tags(line: str) -> list[int]:
    """Each character's word tag (see the module's docstring), from `pos_words` (cached per line)."""
    return _tags(line, pos_words(line))


def tag_matrix(lines: Sequence[str], length: int | None = None, cached: bool = False) -> np.ndarray:
    """(N, length) int8 word tags of N lines of `length` characters (default: the first line's); a shorter line is
    padded with PAD_TAG. `cached`: through `pos_words`' per-line cache (answering, where lines come back); the build
    tags every line once and leaves the cache alone."""
    length = len(lines[0]) if length is None and lines else (length or 0)
    words = pos_words if cached else _pos_words
    out = np.zeros((len(lines), length), dtype=np.int8)
    for row, line in enumerate(lines):
        tags = _tags(line, words(line))[:length]
        out[row, : len(tags)] = tags
    return out
