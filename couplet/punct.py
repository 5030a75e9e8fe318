"""Punctuation marks, defined once (decoding, metrics and validation share this set).

A couplet's punctuation is part of its structure: a mark in the upper line (上联) sits at the
same position in the lower line (下联). Full-width marks (the dataset's usual form) and their
ASCII counterparts are both listed.
"""

from __future__ import annotations

PUNCTUATION: frozenset[str] = frozenset(
    "，。、；：？！“”‘’（）《》…—"  # full-width
    ",.;:?!"  # ASCII
)


def is_punct(ch: str) -> bool:
    """True if `ch` (one character) is a punctuation mark."""
    return ch in PUNCTUATION
