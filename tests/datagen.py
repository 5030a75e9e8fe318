"""Small generated datasets in the exact layout of wb14123/couplet-dataset's couplet.tar.gz.

`couplet/train/in.txt`, `couplet/train/out.txt`, `couplet/test/in.txt`, `couplet/test/out.txt`,
`couplet/vocabs`; one half-line per line, characters separated by single spaces, lines ending
with a space.
"""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

# Frequent characters of real couplets, split in two halves so generated "lower" lines have a
# learnable character-by-character relation to the "upper" ones (a fixed permutation).
UPPER_CHARS = "春风花月山水云天日心人年家国门雨江海情书香梦酒诗红千万长清明"
LOWER_CHARS = "秋雪草星川林霞地夜意客岁户城窗露河湖思画色影茶词绿百两短浊暗"
PAIR = dict(zip(UPPER_CHARS, LOWER_CHARS))


def make_pair(rng: random.Random, length: int, punct: bool = False) -> tuple[str, str]:
    """An aligned pair: lower[i] = PAIR[upper[i]]; optionally a comma in the middle of both."""
    up = "".join(rng.choice(UPPER_CHARS) for _ in range(length))
    down = "".join(PAIR[ch] for ch in up)
    if punct and length >= 4:
        mid = length // 2
        up, down = up[:mid] + "，" + up[mid + 1 :], down[:mid] + "，" + down[mid + 1 :]
    return up, down


def make_pairs(n: int, seed: int = 0, lengths=(5, 7), punct_every: int = 5) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [make_pair(rng, rng.choice(lengths), punct=bool(punct_every) and i % punct_every == 0) for i in range(n)]


def spaced(line: str) -> str:
    return " ".join(line) + " "


def layout_files(train: list[tuple[str, str]], test: list[tuple[str, str]]) -> dict[str, bytes]:
    files = {}
    for split, pairs in (("train", train), ("test", test)):
        files[f"couplet/{split}/in.txt"] = "".join(spaced(u) + "\n" for u, _ in pairs).encode()
        files[f"couplet/{split}/out.txt"] = "".join(spaced(d) + "\n" for _, d in pairs).encode()
    chars = sorted({ch for u, d in train + test for ch in u + d})
    files["couplet/vocabs"] = ("<s>\n</s>\n" + "\n".join(chars) + "\n").encode()
    return files


def write_tarball(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def write_dataset_tarball(path: Path, n_train: int = 200, n_test: int = 40, seed: int = 0, **kwargs) -> Path:
    train = make_pairs(n_train, seed=seed, **kwargs)
    test = make_pairs(n_test, seed=seed + 1000, **kwargs)
    return write_tarball(Path(path), layout_files(train, test))


def write_dataset_dir(root: Path, train: list[tuple[str, str]], test: list[tuple[str, str]]) -> Path:
    for name, data in layout_files(train, test).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root / "couplet"
