"""Punctuation marks and the CJK ideograph ranges, defined once (decoding, metrics and validation
share them).

A couplet's punctuation is part of its structure: a mark in the upper line (上联) sits at the
same position in the lower line (下联). Full-width marks (the dataset's usual form) and their
ASCII counterparts are both listed. Everything else a couplet may hold is an ideograph
(`CJK_RANGES`; the validate stage rejects lines with other characters).
"""

from __future__ import annotations

PUNCTUATION: frozenset[str] = frozenset(
    "，。、；：？！“”‘’（）《》…—"  # full-width
    ",.;:?!"  # ASCII
)


def is_punct(ch: str) -> bool:
    """True if `ch` (one character) is a punctuation mark."""
    return ch in PUNCTUATION


# CJK Unified Ideographs: Extension A, the basic block, compatibility ideographs, Extensions B-F.
CJK_RANGES: tuple[tuple[int, int], ...] = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F))


def is_ideograph(ch: str) -> bool:
    """True if `ch` (one character) lies in one of the CJK ideograph ranges."""
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in CJK_RANGES)
