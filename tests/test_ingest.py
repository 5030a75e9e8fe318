import gzip
import http.server
import io
import socket
import tarfile
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import snapshot
from datagen import layout_files, make_pairs, write_dataset_dir, write_dataset_tarball, write_tarball

from couplet.core.config import DataConfig
from couplet.data.ingest import parse_pairs, run_ingest
from couplet.data.raw import IngestError, fetch_raw


def cfg(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), timeout_s=2.0, retries=2, **kw)


def test_parse_strips_separators_bom_crlf(tmp_path):
    layout = tmp_path / "couplet"
    for split in ("train", "test"):
        (layout / split).mkdir(parents=True)
    (layout / "train" / "in.txt").write_bytes("\ufeff春 风 \r\n晚 风 摇 树 \r\n".encode())
    (layout / "train" / "out.txt").write_bytes("秋 雨 \n晨 雨 润 花".encode())  # no final newline
    (layout / "test" / "in.txt").write_bytes("天 地 \n".encode())
    (layout / "test" / "out.txt").write_bytes("山 河 \n".encode())
    table = parse_pairs(layout)
    assert table.column("up").to_pylist() == ["春风", "晚风摇树", "天地"]
    assert table.column("down").to_pylist() == ["秋雨", "晨雨润花", "山河"]
    assert table.column("split").to_pylist() == ["train", "train", "test"]
    assert table.column("line_no").to_pylist() == [1, 2, 1]


def test_ingest_tarball_then_cached(tmp_path, home):
    tarball = write_dataset_tarball(tmp_path / "couplet.tar.gz", n_train=50, n_test=10)
    first = run_ingest(cfg(tarball), home)
    assert first["status"] == "completed" and first["rows"] == 60
    raw_dir = Path(first["raw_dir"])
    manifest = (raw_dir / "manifest.json").read_text()
    for key in ("source", "sha256", "bytes", "line_counts", "ingested_at"):
        assert f'"{key}"' in manifest
    before = snapshot(raw_dir)
    second = run_ingest(cfg(tarball), home)
    assert second["status"] == "cached" and second["key"] == first["key"]
    assert snapshot(raw_dir) == before  # nothing re-extracted
    table = pq.read_table(first["pairs_path"])
    assert table.column_names == ["split", "line_no", "up", "down"]


def test_directory_source(tmp_path, home):
    layout = write_dataset_dir(tmp_path / "src", make_pairs(20), make_pairs(5, seed=9))
    result = run_ingest(cfg(layout.parent), home)
    assert result["rows"] == 25
    assert run_ingest(cfg(layout), home)["status"] == "cached"  # same content, other path


def test_sha256_verified(tmp_path, home):
    tarball = write_dataset_tarball(tmp_path / "c.tar.gz", n_train=10, n_test=2)
    with pytest.raises(IngestError, match="sha256 mismatch"):
        run_ingest(cfg(tarball, sha256="0" * 64), home)
    import hashlib

    good = hashlib.sha256(tarball.read_bytes()).hexdigest()
    assert run_ingest(cfg(tarball, sha256=good), home)["raw_sha256"] == good


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).requests.append((self.path, self.headers.get("If-Modified-Since")))
        super().do_GET()


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    _Handler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Handler(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_download_and_conditional_get(tmp_path, home, http_root):
    root, base = http_root
    write_dataset_tarball(root / "couplet.tar.gz", n_train=30, n_test=5)
    first = run_ingest(cfg(f"{base}/couplet.tar.gz"), home)
    assert first["rows"] == 35 and not first["raw_cached"]
    second = run_ingest(cfg(f"{base}/couplet.tar.gz"), home)
    assert second["status"] == "cached"
    # the second request was conditional and the server answered 304: nothing downloaded again
    assert _Handler.requests[-1][1] is not None


def test_http_404(home, http_root):
    _, base = http_root
    with pytest.raises(IngestError, match="HTTP 404"):
        run_ingest(cfg(f"{base}/missing.tar.gz"), home)


def test_unreachable_host(home):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once we leave: connection refused
    url = f"http://127.0.0.1:{port}/couplet.tar.gz"
    with pytest.raises(IngestError, match="download failed after 2 attempts: cannot connect") as info:
        run_ingest(cfg(url), home)
    _says_how_to_use_a_local_copy(str(info.value), url)


def _says_how_to_use_a_local_copy(message: str, url: str) -> None:
    """An unreachable source is one line naming the URL and both ways to point at a local copy."""
    assert "\n" not in message and url in message, message
    assert "--source PATH" in message and "SOURCE=PATH ./run.sh" in message, message


def test_unreachable_source_errors_say_how_to_use_a_local_copy(home, http_root, monkeypatch):
    """DNS failure, HTTP error status and time-out, all without the network (requests is stubbed or local)."""
    import requests

    _, base = http_root
    with pytest.raises(IngestError, match="HTTP 404") as info:  # an HTTP error from a local server
        run_ingest(cfg(f"{base}/gone.tar.gz"), home)
    _says_how_to_use_a_local_copy(str(info.value), f"{base}/gone.tar.gz")

    url = "https://couplet-dataset.invalid/couplet.tar.gz"
    for exc, needle in ((requests.exceptions.ConnectionError("Failed to resolve 'couplet-dataset.invalid'"), "cannot connect"),
                        (requests.exceptions.ReadTimeout("read timed out"), "timed out after 2 s")):
        def refuse(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(requests, "get", refuse)
        monkeypatch.setattr("couplet.data.raw.time.sleep", lambda s: None)
        with pytest.raises(IngestError, match=needle) as info:
            run_ingest(cfg(url), home)
        _says_how_to_use_a_local_copy(str(info.value), url)


def _hostile(tmp_path, name: str, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    path = tmp_path / name
    with tarfile.open(path, "w:gz") as tar:
        for fname, content in layout_files(make_pairs(5), make_pairs(2, seed=3)).items():
            info = tarfile.TarInfo(fname)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        tar.addfile(member, io.BytesIO(data) if data else None)
    return path


def _member(name, kind=tarfile.REGTYPE, size=0, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, linkname
    return info


def _bad_sources(tmp_path) -> dict:
    good = write_dataset_tarball(tmp_path / "good.tar.gz", n_train=20, n_test=5).read_bytes()
    (tmp_path / "truncated.tar.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "corrupt.tar.gz").write_bytes(good[:20] + b"\x00" * 200 + good[220:])
    (tmp_path / "notgzip.tar.gz").write_bytes(b"this is not an archive at all\n" * 10)
    files = layout_files(make_pairs(5), make_pairs(2, seed=3))
    write_tarball(tmp_path / "no-out.tar.gz", {k: v for k, v in files.items() if not k.endswith("train/out.txt")})
    uneven = dict(files)
    uneven["couplet/train/out.txt"] = uneven["couplet/train/out.txt"] + "多 余 \n".encode()
    write_tarball(tmp_path / "uneven.tar.gz", uneven)
    bad_utf8 = dict(files)
    bad_utf8["couplet/test/in.txt"] = "天 地 \n".encode() + b"\xff\xfe \n"
    write_tarball(tmp_path / "badutf8.tar.gz", bad_utf8)
    write_tarball(tmp_path / "empty.tar.gz", {k: b"" for k in files})
    return {
        "truncated.tar.gz": "corrupt or truncated",
        "corrupt.tar.gz": "corrupt or truncated",
        "notgzip.tar.gz": "corrupt or truncated",
        "no-out.tar.gz": "missing train/out.txt",
        "uneven.tar.gz": "train/in.txt has 5 lines but train/out.txt has 6",
        "badutf8.tar.gz": "invalid UTF-8 in test/in.txt line 2",
        "empty.tar.gz": "dataset is empty",
        _hostile(tmp_path, "dotdot.tar.gz", _member("../escape.txt", size=3), b"bad").name: "escapes the target directory: ../escape.txt",
        _hostile(tmp_path, "abs.tar.gz", _member("/tmp/abs-escape.txt", size=3), b"bad").name: "escapes the target directory",
        _hostile(tmp_path, "symlink.tar.gz", _member("couplet/link", tarfile.SYMTYPE, linkname="/etc/passwd")).name: "is a link",
        _hostile(tmp_path, "device.tar.gz", _member("couplet/dev", tarfile.CHRTYPE)).name: "device or special file",
        "does-not-exist.tar.gz": "source not found",
    }


def test_bad_inputs_fail_with_one_line_and_change_nothing(tmp_path, home):
    sources = _bad_sources(tmp_path)
    # a good ingest first: its outputs must survive every bad attempt untouched
    run_ingest(cfg(write_dataset_tarball(tmp_path / "ok.tar.gz", n_train=10, n_test=3, seed=4)), home)
    before = snapshot(home / "data" / "processed")
    for name, expected in sources.items():
        with pytest.raises(IngestError) as info:
            run_ingest(cfg(tmp_path / name), home)
        message = str(info.value)
        assert expected in message, (name, message)
        assert "\n" not in message
    assert snapshot(home / "data" / "processed") == before
    assert not (tmp_path / "escape.txt").exists() and not Path("/tmp/abs-escape.txt").exists()
    # no half-extracted raw folder is left behind
    assert all(not p.name.startswith(".tmp-") for p in (home / "data" / "raw" / "couplet").iterdir())


def test_truncated_download_is_an_error_not_a_dataset(home, http_root):
    root, base = http_root
    data = write_dataset_tarball(root / "full.tar.gz", n_train=50, n_test=5).read_bytes()
    (root / "cut.tar.gz").write_bytes(gzip.compress(b"x")[:5] + data[5:100])
    with pytest.raises(IngestError, match="corrupt or truncated"):
        run_ingest(cfg(f"{base}/cut.tar.gz"), home)
    assert not (home / "data" / "processed" / "ingest").exists()


def test_fetch_raw_same_bytes_twice_no_extraction(tmp_path, home):
    tarball = write_dataset_tarball(tmp_path / "c.tar.gz", n_train=10, n_test=2)
    raw, cached = fetch_raw(cfg(tarball), home)
    assert not cached
    raw2, cached2 = fetch_raw(cfg(tarball), home)
    assert cached2 and raw2.root == raw.root


def test_parsing_in_small_batches_gives_the_same_file_and_the_same_errors(tmp_path, monkeypatch):
    """Parsing streams (blocks of bytes, batches of lines): tiny blocks and batches write the same bytes, and
    errors come in the order of reading each file whole (in.txt's UTF-8, out.txt's UTF-8, then line counts)."""
    import couplet.data.ingest as ingest_module

    layout = write_dataset_dir(tmp_path / "src", make_pairs(50), make_pairs(7, seed=9))
    ingest_module.write_pairs(layout, tmp_path / "whole.parquet")
    monkeypatch.setattr(ingest_module, "BATCH_LINES", 4)
    monkeypatch.setattr(ingest_module, "BLOCK_BYTES", 16)
    ingest_module.write_pairs(layout, tmp_path / "batched.parquet")
    assert (tmp_path / "batched.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    assert parse_pairs(layout).num_rows == 57

    def corrupt(rel: str, line: int, drop_last: bool = False) -> int:
        lines = (layout / rel).read_bytes().split(b"\n")
        lines[line - 1] = b"\xff" + lines[line - 1]
        if drop_last:
            lines = lines[:-2] + [b""]
        (layout / rel).write_bytes(b"\n".join(lines))
        return len(b"\n".join(lines[: line - 1])) + 1  # the bad byte's offset

    offset = corrupt("train/out.txt", 40, drop_last=True)  # also one line short
    with pytest.raises(IngestError, match=rf"^invalid UTF-8 in train/out.txt line 40 \(byte {offset}\)$"):
        parse_pairs(layout)
    offset = corrupt("train/in.txt", 45)
    with pytest.raises(IngestError, match=rf"^invalid UTF-8 in train/in.txt line 45 \(byte {offset}\)$"):
        parse_pairs(layout)
    layout = write_dataset_dir(tmp_path / "src2", make_pairs(50), make_pairs(7, seed=9))
    (layout / "train" / "out.txt").write_bytes(b"\n".join((layout / "train" / "out.txt").read_bytes().split(b"\n")[:-2]) + b"\n")
    with pytest.raises(IngestError, match="^train/in.txt has 50 lines but train/out.txt has 49$"):
        parse_pairs(layout)


def test_a_local_source_that_is_gone_is_read_from_the_homes_raw_copy(tmp_path, home, caplog):
    """A home restored elsewhere, or a drop deleted after its ingest: the same --source is served from the raw layer
    (with a warning naming the copy), and ingest stays cached; a path never ingested is still an error."""
    source = write_dataset_tarball(tmp_path / "drop" / "couplet.tar.gz", n_train=20, n_test=4, seed=9)
    first = run_ingest(cfg(source), home)
    older = write_dataset_tarball(tmp_path / "drop" / "other.tar.gz", n_train=12, n_test=3, seed=10)
    run_ingest(cfg(older), home)  # another source's copy in the same raw layer must not be picked
    source.unlink()
    before = snapshot(home / "data")
    with caplog.at_level("WARNING", logger="couplet.data.raw"):
        again = run_ingest(cfg(source), home)
    assert again["status"] == "cached" and again["key"] == first["key"]
    assert any(f"source not found: {source}; using the copy this home ingested" in r.getMessage() for r in caplog.records)
    assert snapshot(home / "data") == before
    pinned = run_ingest(cfg(tmp_path / "drop" / "renamed.tar.gz", sha256=first["raw_sha256"]), home)
    assert pinned["key"] == first["key"]  # a pinned sha256 names the bytes, whatever path they came from
    with pytest.raises(IngestError, match="source not found"):
        run_ingest(cfg(tmp_path / "drop" / "never.tar.gz"), home)
