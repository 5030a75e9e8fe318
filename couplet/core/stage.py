"""The one stage contract: every stage is a content-addressed, cached, atomically written step.

    key = stage_key("build", validated["key"], cfg.min_count, ...)
    return run_cached("build", key, out_dir, produce, force=force)

`stage_key` hashes the stage's inputs together with `code_version(stage)`: a hash of the source of
the stage's module and every `couplet` module it imports, directly or through others (imports inside
functions included). Editing the model, the trainer, a validation rule or the decoder therefore
changes the key of exactly the stages whose code runs it; comments and formatting do not count (the
parsed syntax tree is hashed, not the text).

`run_cached` reuses the output folder when its manifest carries the same key and every file the
manifest lists still has its recorded size and SHA-256 (and Parquet files a readable footer);
otherwise it calls `produce` to write the outputs —
into a temporary folder renamed into place (data stages), or in place with the manifest written
last (train, which resumes from checkpoints, and evaluate, which writes into the model folder).
"""

from __future__ import annotations

import ast
import errno
import functools
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Iterable

from couplet.core.atomic import atomic_directory, atomic_write_json
from couplet.core.catalog import STAGE_MANIFEST, STAGE_MODULES, STAGES

log = logging.getLogger("couplet.core.stage")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the couplet/ folder


def hash_parts(*parts: object) -> str:
    """A short stable hash of the parts' string forms."""
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()[:16]


def _module_file(module: str, root: Path) -> Path | None:
    """couplet.a.b -> root/a/b.py or root/a/b/__init__.py (None when it is not a module of ours)."""
    parts = module.split(".")
    if parts[0] != root.name:
        return None
    base = root.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(tree: ast.AST) -> Iterable[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)  # `from couplet.modelling import model`


@functools.lru_cache(maxsize=256)
def _parsed(path: Path, mtime_ns: int, size: int) -> tuple[str, tuple[str, ...]]:
    """Digest of a module's syntax tree and the modules it imports (cached per file state)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest(), tuple(_imported_modules(tree))


def module_closure(module: str, root: Path = PACKAGE_ROOT) -> dict[str, str]:
    """The syntax-tree digest of `module` and of every package module it imports, transitively."""
    digests: dict[str, str] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        path = _module_file(name, root)
        if name in digests or path is None:
            continue
        stat = path.stat()
        digests[name], imports = _parsed(path, stat.st_mtime_ns, stat.st_size)
        pending += [m for m in imports if m not in digests]
    return digests


def code_version(stage: str, root: Path = PACKAGE_ROOT) -> str:
    """Hash of the syntax trees of the code a stage runs (its module, `STAGE_MODULES`, and imports)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    digests = module_closure(f"{root.name}.{STAGE_MODULES[stage]}", root)
    return hash_parts(*(f"{name}={digests[name]}" for name in sorted(digests)))


def stage_key(stage: str, *inputs: object) -> str:
    """The cache key of a stage: its code version and its inputs (upstream keys, parameters)."""
    return hash_parts(stage, code_version(stage), *inputs)


def _file_sizes(folder: Path, names: Iterable[str]) -> dict[str, int]:
    return {name: (folder / name).stat().st_size for name in names}


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _parquet_footer_error(path: Path) -> str | None:
    import pyarrow.parquet as pq  # only stages that wrote Parquet pay for the import

    try:
        pq.read_metadata(path)
    except Exception as exc:  # ArrowInvalid, OSError: whatever pyarrow says, the footer is unreadable
        return f"unreadable Parquet footer ({' '.join(str(exc).split())[:80]})"
    return None


def read_stage_manifest(folder: str | Path, name: str = STAGE_MANIFEST) -> dict:
    """The manifest a stage wrote last in `folder` (`name`: STAGE_MANIFEST, or a model folder's train.json /
    evaluation.json). The one reader of stage manifests: FileNotFoundError when there is none, ValueError
    when it is not a JSON object, each one line naming the file."""
    path = Path(folder) / name
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no {name} (not a finished stage folder)") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is unreadable: {' '.join(str(exc).split())[:120]}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is not a stage manifest (expected a JSON object)")
    return manifest


def damaged_output(folder: Path, manifest: dict) -> str | None:
    """Why the outputs a manifest lists cannot be trusted, or None when they can.

    Cheap checks, in order: every file is there with its recorded size; every Parquet file's footer
    reads; every file has its recorded SHA-256 (manifests written before hashes were recorded skip
    that check).
    """
    outputs = manifest.get("outputs")
    if not isinstance(outputs, dict) or not outputs:
        return "no outputs recorded"
    for name, size in outputs.items():
        try:
            actual = (folder / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, {size} recorded"
    for name in outputs:
        if name.endswith(".parquet") and (error := _parquet_footer_error(folder / name)):
            return f"{name}: {error}"
    hashes = manifest.get("hashes")
    for name, digest in (hashes if isinstance(hashes, dict) else {}).items():
        try:
            if file_sha256(folder / name) != digest:
                return f"{name} does not match its recorded SHA-256"
        except OSError:
            return f"{name} is unreadable"
    return None


class DiskFull(OSError):
    """A stage's write failed for lack of space: one line naming the stage and what to do."""


def run_cached(
    stage: str,
    key: str,
    out_dir: Path,
    produce: Callable[[Path], dict],
    *,
    force: bool = False,
    manifest_name: str = STAGE_MANIFEST,
    outputs: Iterable[str] | None = None,
    in_place: bool = False,
    started: float | None = None,
) -> dict:
    """Return the stage's manifest, from the cache when `out_dir` already holds it for `key`.

    `produce(folder)` writes the outputs into `folder` and returns the manifest's fields. With
    `in_place=False` the folder is a temporary sibling renamed onto `out_dir` when all is written;
    with `in_place=True` it is `out_dir` itself and the manifest is written last. `outputs` names
    the files whose sizes are recorded (default: every file produced). The result adds `status`
    (`completed` or `cached`) and `seconds`.
    """
    started = time.perf_counter() if started is None else started
    try:
        manifest = read_stage_manifest(out_dir, manifest_name)
    except (OSError, ValueError):
        manifest = {}  # none yet, or unreadable: the stage runs
    if not force and manifest.get("key") == key:
        damage = damaged_output(out_dir, manifest)
        if damage is None:
            return {**manifest, "status": "cached", "seconds": round(time.perf_counter() - started, 3)}
        log.warning("%s: the cached output in %s is damaged (%s); rebuilding it", stage, out_dir, damage)

    def finish(folder: Path) -> dict:
        try:
            fields = produce(folder)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            where = "its model folder" if in_place else "a temporary folder; the cached outputs are untouched"
            raise DiskFull(f"{stage}: no space left on the device of {out_dir.parent} (writing {where}); "
                           "free some space and run again") from None
        names = sorted(outputs) if outputs is not None else sorted(
            str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != manifest_name
        )
        record = {"key": key, "stage": stage, **fields, "code_version": code_version(stage), "outputs": _file_sizes(folder, names),
                  "hashes": {name: file_sha256(folder / name) for name in names}}
        atomic_write_json(folder / manifest_name, record)
        return record

    if in_place:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / manifest_name).unlink(missing_ok=True)
        manifest = finish(out_dir)
    else:
        with atomic_directory(out_dir) as tmp:
            manifest = finish(tmp)
    return {**manifest, "status": "completed", "seconds": round(time.perf_counter() - started, 3)}
