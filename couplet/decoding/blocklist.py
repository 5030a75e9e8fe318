"""Words no answer may contain (decode.blocklist, `--blocklist PATH`), matched over characters.

    blocklist = Blocklist.load(path)          # one word per line; '#' starts a comment line; blank lines skipped
    blocklist.find("...")                     # the first blocked word the text contains, or None
    blocklist.single_chars                    # one-character words: the decoder masks them like any other rule

A line of L characters has L·(L+1)/2 substrings at most, and only the lengths some word has are looked up in a
set, so a 10k-word list costs a few microseconds a line (scripts/bench_infer.py reports it): no automaton needed.
The project ships a small default list of common vulgar words (couplet/decoding/lists/blocklist.txt).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

__all__ = ["Blocklist", "DEFAULT_BLOCKLIST"]

DEFAULT_BLOCKLIST = Path(__file__).resolve().parent / "lists" / "blocklist.txt"


class Blocklist:
    """A set of blocked words, grouped by length for substring look-ups."""

    def __init__(self, words: Iterable[str], source: str = "") -> None:
        cleaned = {"".join(word.split()) for word in words}
        self.words = frozenset(word for word in cleaned if word)
        self.source = source
        self.lengths = tuple(sorted({len(word) for word in self.words}))
        self.single_chars = frozenset(word for word in self.words if len(word) == 1)

    @classmethod
    def load(cls, path: str | Path) -> "Blocklist":
        """Read a UTF-8 word list; an unreadable, non-UTF-8 or empty file is a one-line ValueError naming it."""
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except FileNotFoundError:
            raise ValueError(f"blocklist file not found: {path}") from None
        except IsADirectoryError:
            raise ValueError(f"blocklist {path} is a directory, not a word list") from None
        except OSError as exc:
            raise ValueError(f"blocklist {path} cannot be read ({exc.strerror or exc})") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"blocklist {path} is not UTF-8 text (byte {exc.start})") from None
        words = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not words:
            raise ValueError(f"blocklist {path} has no words (one word per line; '#' starts a comment)")
        return cls(words, source=str(path))

    @classmethod
    def default(cls) -> "Blocklist":
        return cls.load(DEFAULT_BLOCKLIST)

    @classmethod
    def for_settings(cls, use_default: bool, *extra: str | Path | None) -> "Blocklist | None":
        """The default list (when `use_default`) plus the words of each `extra` path given (None: skipped); None when
        no list is asked for."""
        lists = ([cls.default()] if use_default else []) + [cls.load(path) for path in extra if path]
        if not lists:
            return None
        return cls([w for b in lists for w in b.words], source=", ".join(b.source for b in lists))

    def __len__(self) -> int:
        return len(self.words)

    def find(self, text: str) -> str | None:
        """The first blocked word in `text` (by position, then the shortest), or None."""
        words = self.words
        size = len(text)
        for start in range(size):
            for length in self.lengths:
                if start + length > size:
                    break
                piece = text[start : start + length]
                if piece in words:
                    return piece
        return None
