"""`couplet serve`: the couplet robot over HTTP (API + web page), see couplet/serving/ and docs/serving.md."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
from pathlib import Path
from typing import Optional

import typer

from couplet.cli import app, fail


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


MAX_DEFAULT_WORKERS = 8  # beyond this, more processes mostly add memory (one model copy each)


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask where the OS has one, else os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def default_workers(cores: int | None = None) -> int:
    """`--workers` when not given: one server process per usable core, at most MAX_DEFAULT_WORKERS."""
    return max(1, min(usable_cores() if cores is None else cores, MAX_DEFAULT_WORKERS))


def default_threads(workers: int, cores: int | None = None) -> int:
    """`--threads` when not given: torch CPU threads per process.

    One process (`--workers 1`): 1, as before (a single line is fastest on one thread, and two spin
    badly when anything else runs). Several: the usable cores shared out, at least 1 each, so the
    workers together never ask for more threads than there are cores.
    """
    if workers <= 1:
        return 1
    return max(1, (usable_cores() if cores is None else cores) // workers)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind. The default serves this machine only; pass e.g. 0.0.0.0 to open it to the network."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port."),
    model: Optional[str] = typer.Option(None, help="Model directory. Default: the champion in models/registry.json, else the latest trained model."),
    workers: Optional[int] = typer.Option(None, min=1, max=64, help=f"Server processes; each loads the model once and batches its own requests. Default: the usable CPU cores, at most {MAX_DEFAULT_WORKERS}; 1 serves in this process."),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads per process. Default: 1 with one worker, else the usable cores divided among the workers (at least 1); see docs/serving.md."),
    device: str = typer.Option("cpu", help="torch device for inference."),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="Answer concurrent requests in batches from one inference thread (fastest), or one by one in the threadpool."),
    http: str = typer.Option("auto", help="uvicorn HTTP parser: auto (httptools if installed) | h11 | httptools."),
    loop: str = typer.Option("auto", help="uvicorn event loop: auto (uvloop if installed) | asyncio | uvloop."),
    balance: bool = typer.Option(True, "--balance/--no-balance", help="With several workers, a worker holding 2+ more keep-alive connections than another closes one after answering, so the client reconnects to a less busy worker."),
    log_level: str = typer.Option("warning", help="uvicorn log level (critical|error|warning|info|debug)."),
    blocklist: Optional[Path] = typer.Option(None, "--blocklist", help="A word list (UTF-8, one word per line, '#' comments) added to the model's blocklist: no answer contains these words, and a line containing one is refused with 422 (unless the model's decode.block_input is false)."),
) -> None:
    """Serve the couplet robot: POST /api/match, GET /healthz, the web page at /, OpenAPI at /openapi.json."""
    import uvicorn

    from couplet.predictor import InputError, Predictor, resolve_model_dir

    if http not in ("auto", "h11", "httptools"):
        fail(f"--http must be auto, h11 or httptools, got {http!r}")
    if loop not in ("auto", "asyncio", "uvloop"):
        fail(f"--loop must be auto, asyncio or uvloop, got {loop!r}")
    try:
        model_dir = resolve_model_dir(model)
    except (FileNotFoundError, InputError, ValueError, OSError) as exc:
        fail(f"no model to serve: {' '.join(str(exc).split())}")
    if blocklist is not None:
        from couplet.decoding.blocklist import Blocklist

        try:
            Blocklist.load(blocklist)
        except ValueError as exc:
            fail(f"--blocklist: {' '.join(str(exc).split())}")
    if not _port_free(host, port):
        fail(f"cannot listen on {host}:{port}: address in use or not available (choose another with --port/--host)")

    server_kwargs = dict(
        host=host,
        port=port,
        http=http,
        loop=loop,
        log_level=log_level,
        access_log=False,  # per-request logging costs more than the inference itself
        timeout_keep_alive=30,
        limit_concurrency=1024,  # beyond this, new connections get 503 instead of piling up
        server_header=False,
    )
    if workers is None:
        workers = default_workers()
    if threads is None:
        threads = default_threads(workers)
    typer.echo(
        f"couplet: serving {model_dir} on http://{'[' + host + ']' if ':' in host else host}:{port}/ with "
        f"{workers} worker{'s' if workers != 1 else ''} ({threads} torch thread{'s' if threads != 1 else ''} each; Ctrl+C stops)",
        err=True,
    )
    if workers == 1:
        try:
            predictor = Predictor.load(model_dir, device=device, num_threads=threads, blocklist=blocklist)  # once; shared by every request
        except (OSError, ValueError, KeyError) as exc:
            fail(f"cannot load model {model_dir}: {' '.join(str(exc).split())}")
        from couplet.serving import create_app

        _serve_until_signalled(lambda: uvicorn.run(create_app(predictor, batching=batching), **server_kwargs))
    else:
        try:  # fail here, once, with a clear message rather than in every worker
            Predictor.load(model_dir, device=device, blocklist=blocklist)
        except (OSError, ValueError, KeyError) as exc:
            fail(f"cannot load model {model_dir}: {' '.join(str(exc).split())}")
        from couplet.serving.balance import ENV_VAR as BALANCE_ENV
        from couplet.serving.balance import create_slot_file

        # uvicorn's multi-process mode needs an import string; each worker loads the model once.
        os.environ["COUPLET_SERVE_MODEL"] = str(model_dir)
        os.environ["COUPLET_SERVE_DEVICE"] = device
        os.environ["COUPLET_SERVE_BATCHING"] = "1" if batching else "0"
        os.environ["COUPLET_SERVE_THREADS"] = str(threads)
        if blocklist is not None:
            os.environ["COUPLET_SERVE_BLOCKLIST"] = str(blocklist.resolve())
        else:
            os.environ.pop("COUPLET_SERVE_BLOCKLIST", None)
        with tempfile.TemporaryDirectory(prefix="couplet-serve-") as shared:
            if balance:
                os.environ[BALANCE_ENV] = str(create_slot_file(Path(shared) / "slots", workers))
            else:
                os.environ.pop(BALANCE_ENV, None)
            _serve_until_signalled(lambda: uvicorn.run("couplet.serving.app:app_from_env", factory=True, workers=workers, **server_kwargs))


def _serve_until_signalled(run_server) -> None:
    """Run the server; when SIGINT or SIGTERM stopped it (uvicorn drains requests and stops its workers first),
    print one line and exit 130 or 143.

    One worker: uvicorn re-raises the signal it caught once it has shut down, which reaches `record`. Several:
    its supervisor keeps the signal to itself, so the interpreter's wakeup fd (written by the C-level handler
    whatever Python handler runs) tells which signal arrived.
    """
    received: list[int] = []

    def record(signum: int, frame) -> None:
        received.append(signum)

    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    previous = {signum: signal.signal(signum, record) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_server()
    finally:
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        try:
            received += [b for b in reader.recv(256) if b in (signal.SIGINT, signal.SIGTERM)]
        except BlockingIOError:
            pass
        reader.close()
        writer.close()
    if received:
        typer.echo(f"interrupted: {signal.Signals(received[-1]).name}; the server stopped", err=True)
        raise typer.Exit(128 + received[-1])
