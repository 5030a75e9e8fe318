"""The raw layer of stage 1: bring a source into `data/raw/<name>/<sha256[:12]>/`, unchanged.

A source is an http(s) URL, a local `.tar.gz`, or a local directory in the public dataset's layout
(`couplet/train/in.txt`, `couplet/train/out.txt`, `couplet/test/in.txt`, `couplet/test/out.txt`).
Downloads stream with timeouts and retries and repeat as a conditional GET (ETag / Last-Modified);
archives are extracted safely (no absolute paths, `..`, links or devices). The folder keeps the
archive, its extraction and a manifest (their names: `catalog.RAW_FILES`); the same bytes again are
neither downloaded nor extracted twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

from couplet.core.atomic import atomic_directory, atomic_write_json, read_json
from couplet.core.catalog import DATASET_LAYOUT, RAW_FILES, Catalog
from couplet.core.config import DataConfig
from couplet.core.locks import hold_lock
from couplet.core.stage import code_version

SPLITS = DATASET_LAYOUT.splits
LAYOUT_FILES = DATASET_LAYOUT.files
CHUNK = 1 << 20
log = logging.getLogger("couplet.data.raw")


class IngestError(RuntimeError):
    """The source cannot be ingested; the message is one line naming what is wrong."""


@dataclass(frozen=True)
class RawDataset:
    root: Path  # data/raw/<name>/<sha12>/
    layout_dir: Path  # the folder holding train/ and test/
    sha256: str
    manifest: dict


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_layout(directory: Path) -> str:
    """Content hash of a dataset directory: each layout file's relative path and bytes."""
    digest = hashlib.sha256()
    for rel in LAYOUT_FILES:
        digest.update(rel.encode() + b"\0")
        digest.update(sha256_file(directory / rel).encode())
    return digest.hexdigest()


def is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


def find_layout(directory: Path) -> Path:
    """The folder under `directory` that holds train/in.txt etc. (the root itself or one level down)."""
    candidates = [directory, *sorted(p for p in directory.iterdir() if p.is_dir())] if directory.is_dir() else []
    for candidate in candidates:
        if all((candidate / rel).is_file() for rel in LAYOUT_FILES):
            return candidate
    missing = [rel for rel in LAYOUT_FILES if not any((c / rel).is_file() for c in candidates)]
    raise IngestError(f"{directory} is not in the couplet dataset layout: missing {', '.join(missing)}")


# --------------------------------------------------------------------------- download


LOCAL_COPY_HINT = (
    "to use a local copy instead, pass --source PATH (a .tar.gz or a directory in the dataset's layout) "
    "or run SOURCE=PATH ./run.sh"
)


def download_error(detail: str, url: str) -> IngestError:
    """The one-line error of a download that failed, with how to point the pipeline at a local copy."""
    return IngestError(f"download failed{detail} for {url}; {LOCAL_COPY_HINT}")


def download(url: str, dest: Path, cfg: DataConfig, validators: dict | None = None, progress: bool = True) -> dict:
    """Stream `url` into `dest` with timeouts and retries.

    `validators` ({"etag", "last_modified"}) from an earlier download make the request conditional;
    the return value has `not_modified: True` when the server answered 304.
    """
    import requests

    headers = {"User-Agent": "couplet-ingest/1"}
    if validators:
        if validators.get("etag"):
            headers["If-None-Match"] = validators["etag"]
        if validators.get("last_modified"):
            headers["If-Modified-Since"] = validators["last_modified"]
    last_error = "no attempt made"
    for attempt in range(max(cfg.retries, 1)):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
        try:
            with requests.get(url, stream=True, timeout=(cfg.timeout_s, cfg.timeout_s), headers=headers) as resp:
                if resp.status_code == 304:
                    return {"not_modified": True}
                if 400 <= resp.status_code < 500:
                    raise download_error(f": HTTP {resp.status_code} {resp.reason}", url)
                if resp.status_code >= 500:
                    last_error = f"HTTP {resp.status_code} {resp.reason}"
                    continue
                total = int(resp.headers.get("Content-Length") or 0) or None
                digest = hashlib.sha256()
                size = 0
                bar = _progress_bar(total, url) if progress else None
                with open(dest, "wb") as fh:
                    for chunk in resp.iter_content(CHUNK):
                        fh.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                if bar is not None:
                    bar.close()
                if total is not None and size != total:
                    last_error = f"connection closed after {size} of {total} bytes"
                    continue
                return {
                    "not_modified": False,
                    "sha256": digest.hexdigest(),
                    "bytes": size,
                    "etag": resp.headers.get("ETag"),
                    "last_modified": resp.headers.get("Last-Modified"),
                }
        except requests.exceptions.ConnectionError as exc:
            last_error = f"cannot connect ({type(exc).__name__})"
        except requests.exceptions.Timeout:
            last_error = f"timed out after {cfg.timeout_s:g} s"
        except requests.exceptions.RequestException as exc:
            last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    raise download_error(f" after {max(cfg.retries, 1)} attempts: {last_error}", url)


def _progress_bar(total: int | None, url: str):
    from tqdm import tqdm

    name = Path(urlparse(url).path).name or url
    return tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}", file=sys.stderr, leave=False)


# --------------------------------------------------------------------------- extraction


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a .tar(.gz) refusing absolute paths, `..`, links and devices anywhere in it."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                name = member.name
                if name.startswith("/") or os.path.isabs(name) or ".." in Path(name).parts:
                    raise IngestError(f"archive member escapes the target directory: {name}")
                if member.issym() or member.islnk():
                    raise IngestError(f"archive member is a link, refused: {name}")
                if not (member.isfile() or member.isdir()):
                    raise IngestError(f"archive member is a device or special file, refused: {name}")
            if not members:
                raise IngestError(f"archive is empty: {archive.name}")
            # `filter="data"` is a second guard: it also strips odd permission bits.
            tar.extractall(target, members=members, filter="data")
    except IngestError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        detail = " ".join(str(exc).split())
        raise IngestError(f"archive {archive.name} is corrupt or truncated: {detail[:200]}") from None


# --------------------------------------------------------------------------- raw layer


def _raw_manifest(source: str, sha256: str, size: int, layout_dir: Path, root: Path) -> dict:
    counts = {}
    for rel in LAYOUT_FILES:  # newlines, plus a last line without one; a block at a time
        n, last = 0, b""
        with open(layout_dir / rel, "rb") as fh:
            while chunk := fh.read(CHUNK):
                n, last = n + chunk.count(b"\n"), chunk[-1:]
        counts[rel] = n + (1 if last and last != b"\n" else 0)
    return {
        "source": source,
        "sha256": sha256,
        "bytes": size,
        "layout": str(layout_dir.relative_to(root)),
        "line_counts": counts,
        "ingested_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version("ingest"),
    }


def read_raw_manifest(root: Path) -> dict:
    """The manifest of a raw dataset folder `data/raw/<name>/<sha12>/` ({} when it is missing or unreadable:
    the dataset is not there)."""
    return read_json(root / RAW_FILES.manifest)


def _existing_raw(raw_name_dir: Path, sha256: str) -> RawDataset | None:
    root = raw_name_dir / RAW_FILES.dataset(sha256)
    manifest = read_raw_manifest(root)
    if manifest.get("sha256") != sha256:
        return None
    layout_dir = root / manifest["layout"]
    if not all((layout_dir / rel).is_file() for rel in LAYOUT_FILES):
        return None
    return RawDataset(root=root, layout_dir=layout_dir, sha256=sha256, manifest=manifest)


def _store_archive(raw_name_dir: Path, archive: Path, sha256: str, source: str, keep_copy: bool) -> RawDataset:
    root = raw_name_dir / RAW_FILES.dataset(sha256)
    with atomic_directory(root) as tmp:
        extracted = tmp / RAW_FILES.extracted
        extracted.mkdir()
        safe_extract(archive, extracted)
        layout_dir = find_layout(extracted)
        if keep_copy:
            shutil.copyfile(archive, tmp / RAW_FILES.archive)
        else:
            os.replace(archive, tmp / RAW_FILES.archive)
        manifest = _raw_manifest(source, sha256, (tmp / RAW_FILES.archive).stat().st_size, layout_dir, tmp)
        atomic_write_json(tmp / RAW_FILES.manifest, manifest)
    return RawDataset(root=root, layout_dir=root / manifest["layout"], sha256=sha256, manifest=manifest)


def _store_directory(raw_name_dir: Path, layout_src: Path, sha256: str, source: str) -> RawDataset:
    root = raw_name_dir / RAW_FILES.dataset(sha256)
    with atomic_directory(root) as tmp:
        layout_dir = tmp / RAW_FILES.copied_layout
        for rel in LAYOUT_FILES:
            (layout_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(layout_src / rel, layout_dir / rel)
        size = sum((layout_dir / rel).stat().st_size for rel in LAYOUT_FILES)
        manifest = _raw_manifest(source, sha256, size, layout_dir, tmp)
        atomic_write_json(tmp / RAW_FILES.manifest, manifest)
    return RawDataset(root=root, layout_dir=root / manifest["layout"], sha256=sha256, manifest=manifest)


def _kept_copy(raw_name_dir: Path, source: str, expected: str | None) -> RawDataset | None:
    """The raw layer's newest copy of the local file or folder `source` (as it was ingested, or the one with the
    expected sha256), for a source that is gone: a home restored elsewhere, or a drop cleaned up after ingest."""
    if expected:  # the bytes are pinned: whichever path they came from
        return _existing_raw(raw_name_dir, expected)
    copies = []
    for manifest_path in raw_name_dir.glob(f"*/{RAW_FILES.manifest}"):
        manifest = read_raw_manifest(manifest_path.parent)
        if manifest.get("source") == source and (hit := _existing_raw(raw_name_dir, manifest.get("sha256", ""))) is not None:
            copies.append((manifest.get("ingested_at", ""), hit.root.name, hit))
    return max(copies, key=lambda c: c[:2])[2] if copies else None


def fetch_raw(cfg: DataConfig, home: Path, progress: bool = True) -> tuple[RawDataset, bool]:
    """Bring the source into the raw layer. Returns the dataset and whether it was already there."""
    source = cfg.source
    raw_name_dir = Catalog(home).raw_dir(cfg.name)
    raw_name_dir.mkdir(parents=True, exist_ok=True)
    expected = cfg.sha256.lower() if cfg.sha256 else None

    if is_url(source):
        index_path = raw_name_dir / RAW_FILES.sources
        index = read_json(index_path)
        known = index.get(source)
        if expected and (hit := _existing_raw(raw_name_dir, expected)):
            return hit, True
        validators = None
        if known and _existing_raw(raw_name_dir, known["sha256"]):
            validators = known
        tmp = raw_name_dir / f".download-{os.getpid()}-{time.time_ns()}.part"
        try:
            info = download(source, tmp, cfg, validators=validators, progress=progress)
            if info["not_modified"]:
                hit = _existing_raw(raw_name_dir, known["sha256"])
                if hit is not None and (expected is None or expected == hit.sha256):
                    return hit, True
                raise IngestError(f"server says {source} is unchanged but its sha256 differs from the expected one")
            if expected and info["sha256"] != expected:
                raise IngestError(f"sha256 mismatch for {source}: expected {expected}, got {info['sha256']}")
            hit = _existing_raw(raw_name_dir, info["sha256"])
            raw = hit or _store_archive(raw_name_dir, tmp, info["sha256"], source, keep_copy=False)
        finally:
            tmp.unlink(missing_ok=True)
        with hold_lock(home, f"data/raw/{cfg.name}/sources"):  # concurrent ingests share the index
            index = read_json(index_path)
            index[source] = {k: info.get(k) for k in ("sha256", "etag", "last_modified")}
            atomic_write_json(index_path, index)
        return raw, hit is not None

    path = Path(source).expanduser()
    if not path.exists():
        kept = _kept_copy(raw_name_dir, str(path.resolve()), expected)
        if kept is None:
            raise IngestError(f"source not found: {source}")
        log.warning("source not found: %s; using the copy this home ingested from it on %s (%s, sha256 %s)",
                    source, kept.manifest.get("ingested_at", "?"), Catalog(home).relative(kept.root), kept.sha256[:12])
        return kept, True
    if path.is_dir():
        layout = find_layout(path)
        sha256 = sha256_layout(layout)
    else:
        sha256 = sha256_file(path)
    if expected and sha256 != expected:
        raise IngestError(f"sha256 mismatch for {source}: expected {expected}, got {sha256}")
    hit = _existing_raw(raw_name_dir, sha256)
    if hit is not None:
        return hit, True
    source_abs = str(path.resolve())
    if path.is_dir():
        return _store_directory(raw_name_dir, layout, sha256, source_abs), False
    return _store_archive(raw_name_dir, path, sha256, source_abs, keep_copy=True), False
