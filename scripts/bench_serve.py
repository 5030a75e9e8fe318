#!/usr/bin/env python
"""Load-test `couplet serve`: POST /api/match from a second process over loopback; prints JSON.

Starts `couplet serve` as a subprocess on a free 127.0.0.1 port (with a random-initialised, seed-sized
model unless --model is given, or not at all with --url), waits for /healthz, drives it with
--connections concurrent keep-alive clients for --duration seconds (after --warmup seconds), then stops
it. The load comes from `wrk` when installed (`apt-get install -y wrk`), else from a built-in raw-socket
client (one thread per connection, in this process, which is not the server's).

    .venv/bin/python scripts/bench_serve.py                      # seed-sized random model, 4 connections, 10 s
    .venv/bin/python scripts/bench_serve.py --model models/RUN --connections 8 --duration 20
    .venv/bin/python scripts/bench_serve.py --server-args="--workers 2"     # (use = : the value starts with -)
    .venv/bin/python scripts/bench_serve.py --url http://127.0.0.1:8000   # an already running server
    .venv/bin/python scripts/bench_serve.py --studio                       # body with pins {"0": "秋"} and alternatives 5
    .venv/bin/python scripts/bench_serve.py --pin 0=秋 --pin 3=明 --alternatives 8 --direction up

The request body is {"upper": --upper, "top_k": --top-k} plus, when given, "direction", "pins" (--pin POS=CHAR,
repeatable), "head" and "alternatives" (issue 18's studio fields; plain requests are batched, these are not).

Output (one JSON object): requests, errors, duration_s, rps, p50_ms, p90_ms, p99_ms, max_ms, client, ...
Every run is bounded: --duration caps the measured time, --max-requests caps the count (raw client),
and the server gets --startup-timeout seconds to come up.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_UPPER = "春风得意马蹄疾"  # 7 characters, like most of the dataset's lines
PUNCT = "，。！？；：、"


def make_random_model(model_dir: Path, vocab_size: int = 6000, embed_dim: int = 128, n_blocks: int = 6, seed: int = 0, must_have: str = DEFAULT_UPPER,
                      kind: str = "gated_cnn") -> Path:
    """A seed-sized labeller of `kind` with random weights (the speed of a trained one, none of the sense).

    `kind` is the seed's (gated_cnn) unless asked: the config's default kind may change, these figures should not.
    """
    import torch

    from couplet.core.config import Config, replace
    from couplet.modelling.model import build_labeller, save_labeller
    from couplet.data.vocab import Vocab

    chars = list(dict.fromkeys(must_have + PUNCT))
    cp = 0x4E00
    while len(chars) < vocab_size - 2:
        ch = chr(cp)
        if ch not in chars:
            chars.append(ch)
        cp += 1
    counts = Counter({ch: 1_000_000 - i for i, ch in enumerate(chars)})
    vocab = Vocab.from_counts(counts, min_count=1)
    config = replace(Config(), "model", kind=kind, embed_dim=embed_dim, n_blocks=n_blocks)
    torch.manual_seed(seed)
    model = build_labeller(len(vocab), config.model).eval()
    save_labeller(model, vocab, config, model_dir)
    return model_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, timeout_s: float, proc: subprocess.Popen | None) -> dict:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:
                return json.loads(resp.read())
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    raise SystemExit(f"server not healthy within {timeout_s:g} s: {last}")


# ---------------------------------------------------------------------------------------- raw client


def _request_bytes(host: str, port: int, body: bytes) -> bytes:
    head = (
        f"POST /api/match HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode("ascii") + body


def _read_response(sock: socket.socket, buf: bytearray) -> tuple[int, bool]:
    """Read one HTTP/1.1 response (Content-Length framed) off `sock`; returns its status and whether the
    server closes the connection after it (`Connection: close`, e.g. `couplet serve` rebalancing workers)."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    head = bytes(buf[:end]).decode("latin-1")
    status = int(head.split(" ", 2)[1])
    length, closing = 0, False
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
        elif name.strip().lower() == "connection":
            closing = "close" in value.lower()
    need = end + 4 + length
    while len(buf) < need:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    del buf[:need]
    return status, closing


def raw_load(host: str, port: int, body: bytes, connections: int, warmup_s: float, duration_s: float, max_requests: int) -> dict:
    request = _request_bytes(host, port, body)
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors = Counter()
    lock = threading.Lock()
    issued = [0]
    start_evt = threading.Event()
    t_measure = [0.0]
    t_stop = [0.0]

    def connect() -> socket.socket:
        sock = socket.create_connection((host, port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    reconnects = [0]

    def worker(i: int) -> None:
        sock = connect()
        buf = bytearray()
        mine = latencies[i]
        start_evt.wait()
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= t_stop[0]:
                    return
                sock.sendall(request)
                status, closing = _read_response(sock, buf)
                t1 = time.perf_counter()
                if closing:  # as a keep-alive client does: a new connection for the next request
                    sock.close()
                    sock, buf = connect(), bytearray()
                    reconnects[0] += 1
                if t0 >= t_measure[0]:
                    with lock:
                        if issued[0] >= max_requests:
                            return
                        issued[0] += 1
                    if status == 200:
                        mine.append(t1 - t0)
                    else:
                        errors[f"status_{status}"] += 1
        except OSError as exc:
            errors[type(exc).__name__] += 1
        finally:
            sock.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(connections)]
    for t in threads:
        t.start()
    now = time.perf_counter()
    t_measure[0] = now + warmup_s
    t_stop[0] = now + warmup_s + duration_s
    start_evt.set()
    for t in threads:
        t.join(timeout=warmup_s + duration_s + 30)
    elapsed = min(time.perf_counter(), t_stop[0]) - t_measure[0]
    lat = sorted(x for part in latencies for x in part)

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 3) if lat else float("nan")

    return {
        "requests": len(lat),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "duration_s": round(elapsed, 3),
        "rps": round(len(lat) / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": round(lat[-1] * 1000, 3) if lat else float("nan"),
        "reconnects": reconnects[0],
    }


# ------------------------------------------------------------------------- connections per server process


def _connections_by_pid(root: int, port: int) -> list[int]:
    """Established connections to local `port` held by each process in `root`'s tree (Linux /proc), sorted."""
    pids = {root}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int(Path(entry, "stat").read_text().rsplit(")", 1)[1].split()[1]) == root:
                pids.add(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    owner = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owner[target[8:-1]] = pid
        except OSError:
            continue
    counts = Counter()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01" and fields[9] in owner:
            counts[owner[fields[9]]] += 1
    return sorted(counts.values(), reverse=True)


class SplitSampler:
    """Samples, once a second in a thread, how the client's connections are spread over the server's
    processes; `stop()` returns how often each split was seen, e.g. {"2-2": 9, "3-1": 1}."""

    def __init__(self, server_pid: int, port: int):
        self.seen = Counter()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(server_pid, port), daemon=True)
        self.thread.start()

    def _run(self, server_pid: int, port: int) -> None:
        while not self.done.wait(1.0):
            split = _connections_by_pid(server_pid, port)
            if split:
                self.seen["-".join(map(str, split))] += 1

    def stop(self) -> dict:
        self.done.set()
        self.thread.join()
        return dict(self.seen.most_common())


# ---------------------------------------------------------------------------------------------- wrk

_WRK_LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = io.open(os.getenv("BENCH_BODY_FILE"), "rb"):read("*a")
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_JSON {\"requests\":%d,\"duration_us\":%d,\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d," ..
    "\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d,\"max_us\":%d,\"mean_us\":%.1f}\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


def wrk_load(url: str, body: bytes, connections: int, warmup_s: float, duration_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(_WRK_LUA)
        body_file = Path(tmp) / "body.json"
        body_file.write_bytes(body)
        env = {**os.environ, "BENCH_BODY_FILE": str(body_file)}
        base = ["wrk", "-t", "1", "-c", str(connections), "-s", str(script), "--timeout", "5s"]
        if warmup_s > 0:
            subprocess.run([*base, "-d", f"{max(1, round(warmup_s))}s", url + "/api/match"], env=env, capture_output=True, timeout=warmup_s + 30, check=True)
        out = subprocess.run([*base, "-d", f"{max(1, round(duration_s))}s", url + "/api/match"], env=env, capture_output=True, text=True, timeout=duration_s + 30, check=True).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise SystemExit(f"could not read wrk's output:\n{out}")
    r = json.loads(line[len("BENCH_JSON "):])
    errors = {k: r[k] for k in ("connect", "read", "write", "status", "timeout") if r[k]}
    ok = r["requests"] - r["status"]
    dur = r["duration_us"] / 1e6
    return {
        "requests": r["requests"],
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "duration_s": round(dur, 3),
        "rps": round(ok / dur, 1) if dur > 0 else 0.0,
        "p50_ms": r["p50_us"] / 1000,
        "p90_ms": r["p90_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "max_ms": r["max_us"] / 1000,
    }


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model dir to serve (default: a random-initialised seed-sized model)")
    ap.add_argument("--url", help="benchmark an already running server instead of starting one")
    ap.add_argument("--server-args", default="", help='extra `couplet serve` arguments, e.g. "--workers 2 --threads 1"')
    ap.add_argument("--connections", "-c", type=int, default=4, help="concurrent keep-alive connections")
    ap.add_argument("--duration", "-d", type=float, default=10.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    ap.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many measured requests (raw client)")
    ap.add_argument("--client", choices=("auto", "wrk", "raw"), default="auto")
    ap.add_argument("--upper", default=DEFAULT_UPPER)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--pin", action="append", default=[], metavar="POS=CHAR", help='a pin in the body ("pins": {"POS": "CHAR"}); repeatable')
    ap.add_argument("--head", help='"head" in the body (藏头)')
    ap.add_argument("--alternatives", type=int, default=0, help='"alternatives" in the body (0: left out)')
    ap.add_argument("--direction", choices=("down", "up"), default="down", help='"direction" in the body (down: left out)')
    ap.add_argument("--studio", action="store_true", help="issue 18's benchmark body: --pin 0=秋 --alternatives 5 (unless given)")
    ap.add_argument("--vocab-size", type=int, default=6000)
    ap.add_argument("--embed-dim", type=int, default=128)
    ap.add_argument("--n-blocks", type=int, default=6)
    ap.add_argument("--kind", default="gated_cnn", help="model.kind of the random model (default: the seed's gated_cnn)")
    ap.add_argument("--startup-timeout", type=float, default=120.0)
    args = ap.parse_args(argv)

    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "raw"
    if client == "wrk" and not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install -y wrk), use --client raw")

    if args.studio:
        args.pin = args.pin or ["0=秋"]
        args.alternatives = args.alternatives or 5
    fields: dict = {"upper": args.upper, "top_k": args.top_k}
    if args.direction != "down":
        fields["direction"] = args.direction
    pins = {}
    for raw in args.pin:
        pos, sep, ch = raw.partition("=")
        if not sep or not pos.isdigit() or len(ch) != 1:
            raise SystemExit(f"--pin {raw!r}: expected POS=CHAR")
        pins[pos] = ch
    if pins:
        fields["pins"] = pins
    if args.head:
        fields["head"] = args.head
    if args.alternatives:
        fields["alternatives"] = args.alternatives
    body = json.dumps(fields, ensure_ascii=False).encode("utf-8")
    must_have = args.upper + "".join(pins.values()) + (args.head or "")
    proc = None
    tmp = None
    try:
        if args.url:
            url = args.url.rstrip("/")
            model_desc = "external"
        else:
            if args.model:
                model_dir = Path(args.model)
                model_desc = str(model_dir)
            else:
                tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
                model_dir = make_random_model(Path(tmp.name) / "random-seed-sized", args.vocab_size, args.embed_dim, args.n_blocks, must_have=must_have, kind=args.kind)
                model_desc = f"random init {args.kind}, vocab {args.vocab_size}, embed {args.embed_dim}, {args.n_blocks} blocks"
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-c", "import sys; from couplet.cli import main; sys.exit(main())", "serve", "--host", "127.0.0.1", "--port", str(port), "--model", str(model_dir), *shlex.split(args.server_args)]
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        health = wait_healthy(url, args.startup_timeout, proc)
        load_before = os.getloadavg()[0]
        host, port_s = url.split("://", 1)[1].split(":")
        splits = SplitSampler(proc.pid, int(port_s)) if proc is not None else None
        if client == "wrk":
            result = wrk_load(url, body, args.connections, args.warmup, args.duration)
        else:
            result = raw_load(host, int(port_s), body, args.connections, args.warmup, args.duration, args.max_requests)
        if splits is not None:
            result["connection_splits"] = splits.stop()
        result.update(
            client=client,
            connections=args.connections,
            upper=args.upper,
            top_k=args.top_k,
            body=fields,
            model=model_desc,
            model_id=health.get("model"),
            server_args=args.server_args,
            cpus=os.cpu_count(),
            loadavg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],  # before/after: other work on the machine skews results
        )
        print(json.dumps(result, ensure_ascii=False))
        return 0
    finally:
        if proc is not None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            err = proc.stderr.read() if proc.stderr else ""
            if proc.returncode not in (0, -signal.SIGINT, 130) and err:
                print(err[-2000:], file=sys.stderr)
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
