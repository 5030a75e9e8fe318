"""Write-then-rename helpers: a crash never leaves a half-written file or folder visible."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` for a writer that wants a file name (torch.save, savefig,
    safetensors' save_file); when the block succeeds it is renamed onto `path`, when it fails it is removed.

    The temporary name keeps `path`'s suffix last, so writers that pick a format by suffix still do.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when the block failed


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def read_json(path: Path) -> dict:
    """A JSON file's content, or {} when it is missing or unreadable (a manifest not written yet)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` in one rename.

    If `final` already exists (another run finished the same content first) the new copy
    is discarded: outputs are content-addressed, so both are equal.
    """
    created = [p for p in (final.parent, *final.parent.parents) if not p.exists()]  # removed again on failure
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # innermost first; one another run has written into stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    if final.exists():
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.replace(tmp, final)
        except OSError:
            # a concurrent run renamed its copy first (non-empty target); ours is equal, drop it
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.exists():
                raise
