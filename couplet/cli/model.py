"""`couplet match` (ask the model) and `couplet evaluate` (score it on a pair of files)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import typer

from couplet.cli import app, fail

_MODEL_HELP = "Model directory. Default: the champion in models/registry.json, else the latest trained model."
_BATCH = 512


def _load_predictor(model: Optional[str], batch: bool = False):
    import torch

    from couplet.predictor import ModelNotFoundError, Predictor, resolve_model_dir

    try:
        model_dir = resolve_model_dir(model)
    except (ModelNotFoundError, OSError, ValueError) as exc:
        fail(" ".join(str(exc).split()))
    # One line is a handful of tiny ops: extra intra-op threads gain little and, on a busy machine,
    # make torch's thread barriers wait (2 threads on 2 busy cores: ~50x slower). Batches of lines do
    # gain from a few threads. See docs/decoding.md and scripts/bench_infer.py.
    threads = min(4, torch.get_num_threads()) if batch else 1
    try:
        return Predictor.load(model_dir, num_threads=threads)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        fail(f"cannot load model {model_dir}: {' '.join(str(exc).split())}")


def _format(result, top_k: int, as_json: bool) -> str:
    if as_json:
        from couplet.serving.schemas import match_payload  # the API's answer, field for field

        return json.dumps(match_payload(result), ensure_ascii=False)
    if top_k == 1:
        return result.best
    return "\t".join(c.lower for c in result.candidates)


def _format_error(raw: str, message: str, as_json: bool) -> str:
    if as_json:
        return json.dumps({"upper": raw, "error": message}, ensure_ascii=False)
    return f"error: {message}"


def _stream_chunks(stream) -> Iterator[list[str]]:
    """Lines of `stream` in chunks of whatever has arrived, so a pipe gets answers as it writes."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is None:  # not a real file (e.g. a test runner's stream): read it whole
        yield from _chunks(stream.read().lstrip("\ufeff").split("\n"))
        return
    pending = b""
    first = True
    while True:
        data = os.read(fd, 1 << 16)  # returns as soon as some input is there
        if not data:
            break
        if first:
            data = data.removeprefix(b"\xef\xbb\xbf")
            first = False
        pending += data
        *complete, pending = pending.split(b"\n")
        if complete:
            yield from _chunks([line.decode("utf-8", errors="replace") for line in complete] + [""])
    if pending:
        yield from _chunks([pending.decode("utf-8", errors="replace")])


def _chunks(lines: list[str]) -> Iterator[list[str]]:
    lines = [line.rstrip("\r") for line in lines]
    if lines and lines[-1] == "":
        lines.pop()
    for start in range(0, len(lines), _BATCH):
        yield lines[start : start + _BATCH]


def _answer_stream(predictor, chunks: Iterator[list[str]], top_k: int, constrained: bool, tone: bool, as_json: bool) -> int:
    bad = 0
    for chunk in chunks:
        results = predictor.match_batch(chunk, top_k=top_k, constrained=constrained, tone=tone, errors="return")
        out = []
        for raw, res in zip(chunk, results):
            if isinstance(res, Exception):
                bad += 1
                out.append(_format_error(raw, str(res), as_json))
            else:
                out.append(_format(res, top_k, as_json))
        sys.stdout.write("\n".join(out) + "\n")
        sys.stdout.flush()
    return bad


def _interactive(predictor, top_k: int, constrained: bool, tone: bool, as_json: bool) -> None:
    from couplet.core.config import couplet_home
    from couplet.predictor import InputError

    history = couplet_home() / ".couplet_history"
    try:
        import readline
    except ImportError:  # pragma: no cover - platforms without readline
        readline = None
    if readline is not None:
        try:
            if history.is_file():
                readline.read_history_file(str(history))
            readline.set_history_length(1000)
        except OSError:
            pass
    typer.echo(f"couplet: model {predictor.model_id}; type an upper line (上联), Ctrl-D leaves.", err=True)
    try:
        while True:
            try:
                line = input("上联> ")
            except EOFError:
                typer.echo("", err=True)
                break
            except KeyboardInterrupt:
                typer.echo("", err=True)
                break
            if not line.strip():
                continue
            try:
                result = predictor.match(line, top_k=top_k, constrained=constrained, tone=tone)
            except InputError as exc:
                typer.echo(f"error: {exc}")
                continue
            if as_json:
                typer.echo(_format(result, top_k, as_json))
            elif top_k == 1:
                typer.echo(f"下联: {result.best}")
            else:
                for i, c in enumerate(result.candidates, 1):
                    typer.echo(f"{i:>2}. {c.lower}  ({c.score:.2f})")
    finally:
        if readline is not None:
            try:
                history.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(str(history))
            except OSError:
                pass


@app.command()
def match(
    upper: Optional[str] = typer.Argument(None, help="The upper line (上联). Without it: lines from --file or stdin, or a prompt."),
    model: Optional[str] = typer.Option(None, "--model", help=_MODEL_HELP),
    top_k: int = typer.Option(1, "--top-k", "-k", min=1, max=100, help="Whole-line alternatives to show."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (one object per answer)."),
    tone: bool = typer.Option(False, "--tone/--no-tone", help="Upper line ending in 仄 -> lower line ends in 平."),
    unconstrained: bool = typer.Option(False, "--unconstrained", help="The seed's plain argmax (no couplet constraints)."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Answer every line of this file ('-' = stdin), one output line each."),
) -> None:
    """Answer an upper line (上联) with a lower line (下联).

    With an argument: one answer. With --file or piped stdin: one output line per input line (a bad
    line gets an `error: ...` line). Otherwise an interactive prompt (history in $COUPLET_HOME/.couplet_history).
    """
    from couplet.predictor import InputError

    constrained = not unconstrained
    if upper is not None and file is not None:
        fail("give either an upper line or --file, not both")
    if upper is not None:
        predictor = _load_predictor(model)
        try:
            result = predictor.match(upper, top_k=top_k, constrained=constrained, tone=tone)
        except InputError as exc:
            fail(str(exc))
        if as_json or top_k == 1:
            typer.echo(_format(result, top_k, as_json))
        else:
            for i, c in enumerate(result.candidates, 1):
                typer.echo(f"{i:>2}. {c.lower}  ({c.score:.2f})")
        return
    if file is not None and str(file) != "-":
        if not file.is_file():
            fail(f"file not found: {file}")
        try:
            text = file.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            fail(f"{file} is not UTF-8 text (byte {exc.start})")
        predictor = _load_predictor(model, batch=True)
        _answer_stream(predictor, _chunks(text.split("\n")), top_k, constrained, tone, as_json)
        return
    stdin = sys.stdin
    if file is not None or stdin is None or not stdin.isatty():
        predictor = _load_predictor(model, batch=True)
        _answer_stream(predictor, _stream_chunks(stdin), top_k, constrained, tone, as_json)
        return
    predictor = _load_predictor(model)
    _interactive(predictor, top_k, constrained, tone, as_json)


def _metrics_table(metrics: dict):
    from rich.table import Table

    table = Table(title=f"couplet evaluate: {metrics.get('model', '')} on {metrics['n']} couplets")
    table.add_column("metric")
    table.add_column("predictions", justify="right")
    table.add_column("references", justify="right")
    refs = metrics.get("references", {})
    for key, value in metrics.items():
        if key in ("references", "model", "decoding"):
            continue
        ref = refs.get(key)
        fmt = (lambda v: f"{v:.4f}" if isinstance(v, float) else str(v))
        table.add_row(key, fmt(value), "" if ref is None else fmt(ref))
    table.caption = "decoding: " + ", ".join(metrics.get("decoding", []))
    return table


@app.command()
def evaluate(
    model: Optional[str] = typer.Option(None, "--model", help=_MODEL_HELP),
    in_path: Path = typer.Option(..., "--in", help="Upper lines, the dataset's format (in.txt)."),
    out_path: Path = typer.Option(..., "--out", help="Reference lower lines, line by line with --in (out.txt)."),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="Write the decoded lower lines here, one per input line."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    tone: bool = typer.Option(False, "--tone/--no-tone", help="Also enforce the final-tone rule."),
    unconstrained: bool = typer.Option(False, "--unconstrained", help="The seed's plain argmax."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate the first N pairs only."),
) -> None:
    """Score a model on a pair of files: accuracy, character BLEU and couplet-structure rates."""
    from couplet.core.atomic import atomic_write_text
    from couplet.evaluation.evaluate import evaluate_pairs, read_pair_files

    try:
        uppers, references = read_pair_files(in_path, out_path)
    except (OSError, ValueError) as exc:
        fail(" ".join(str(exc).split()))
    if limit is not None:
        uppers, references = uppers[:limit], references[:limit]
    if not uppers:
        fail(f"{in_path} has no lines to evaluate")
    predictor = _load_predictor(model, batch=True)
    metrics, preds = evaluate_pairs(predictor, uppers, references, constrained=not unconstrained, tone=tone)
    if predictions is not None:
        try:
            atomic_write_text(predictions, "".join(p + "\n" for p in preds))
        except OSError as exc:
            fail(f"cannot write {predictions}: {' '.join(str(exc).split())}")
    if as_json:
        typer.echo(json.dumps(metrics, ensure_ascii=False, indent=2, sort_keys=True))
    else:
        from rich.console import Console

        Console().print(_metrics_table(metrics))
