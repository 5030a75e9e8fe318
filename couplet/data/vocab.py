"""Character vocabulary: ids 0 = PAD, 1 = UNK, then characters by falling count."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PAD, UNK = 0, 1
PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"


@dataclass
class Vocab:
    itos: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    min_count: int = 2

    def __post_init__(self) -> None:
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}
        # Codepoint -> id lookup so whole arrays of characters encode without a Python loop.
        codepoints = np.array([ord(ch) for ch in self.itos[2:]], dtype=np.int64)
        order = np.argsort(codepoints)
        self._sorted_codepoints = codepoints[order]
        self._sorted_ids = (order + 2).astype(np.int32)

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def from_counts(cls, counts: Counter | dict[str, int], min_count: int = 2) -> "Vocab":
        kept = sorted((ch for ch, n in counts.items() if n >= min_count), key=lambda ch: (-counts[ch], ch))
        return cls(itos=[PAD_TOKEN, UNK_TOKEN, *kept], counts={ch: int(counts[ch]) for ch in kept}, min_count=min_count)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(ch, UNK) for ch in text]

    def encode_codepoints(self, codepoints: np.ndarray) -> np.ndarray:
        """Map an integer array of Unicode codepoints to ids (UNK where unknown)."""
        flat = codepoints.reshape(-1).astype(np.int64)
        pos = np.searchsorted(self._sorted_codepoints, flat)
        pos = np.clip(pos, 0, max(len(self._sorted_codepoints) - 1, 0))
        if len(self._sorted_codepoints) == 0:
            return np.full(codepoints.shape, UNK, dtype=np.int32)
        found = self._sorted_codepoints[pos] == flat
        ids = np.where(found, self._sorted_ids[pos], UNK).astype(np.int32)
        return ids.reshape(codepoints.shape)

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] for i in ids)

    def to_json(self) -> dict:
        return {"version": 1, "min_count": self.min_count, "size": len(self.itos), "itos": self.itos, "counts": self.counts}

    def save(self, path: str | Path) -> None:
        from couplet.core.atomic import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_json(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(itos=data["itos"], counts=data.get("counts", {}), min_count=data.get("min_count", 2))
