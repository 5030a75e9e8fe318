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


def _load_predictor(model: Optional[str], batch: bool = False, blocklist: Optional[Path] = None):
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
    if blocklist is not None:
        from couplet.decoding.blocklist import Blocklist

        try:
            Blocklist.load(blocklist)
        except ValueError as exc:
            fail(f"--blocklist: {' '.join(str(exc).split())}")
    try:
        return Predictor.load(model_dir, num_threads=threads, blocklist=blocklist)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        fail(f"cannot load model {model_dir}: {' '.join(str(exc).split())}")


def _format(result, top_k: int, as_json: bool) -> str:
    if as_json:
        from couplet.serving.schemas import match_payload  # the API's answer, field for field

        return json.dumps(match_payload(result), ensure_ascii=False)
    if top_k == 1:
        return result.best
    return "\t".join(c.lower for c in result.candidates)


def _format_alternatives(result) -> list[str]:
    """The alternatives of the best line, one line per position: `  0 海 | 月 -22.56  云 -22.77`."""
    rows = []
    for i, (ch, others) in enumerate(zip(result.best, result.alternatives)):
        shown = "  ".join(f"{a.char} {a.score:.2f}" for a in others) if others else "(none)"
        rows.append(f"{i:>3} {ch} | {shown}")
    return rows


def _print_answer(result, top_k: int, as_json: bool, prefix: str = "") -> None:
    """One answer of a single line or the prompt: the best line (or a numbered list), then its alternatives."""
    if as_json:
        typer.echo(_format(result, top_k, as_json))
        return
    if top_k == 1:
        typer.echo(prefix + result.best)
    else:
        for i, c in enumerate(result.candidates, 1):
            typer.echo(f"{i:>2}. {c.lower}  ({c.score:.2f})")
    if result.alternatives:
        typer.echo("alternatives (position, character | others with the line's score):")
        for row in _format_alternatives(result):
            typer.echo(row)


def _parse_pins(pins: list[str], head: Optional[str]) -> dict[int, str]:
    """`--pin POS=CHAR` (repeatable) and `--head CHAR` as {position: character}; a malformed one fails in one line."""
    found: dict[int, str] = {}
    for raw in pins:
        pos, sep, ch = raw.partition("=")
        pos = pos.strip()
        if not sep or not pos.isascii() or not pos.isdigit() or len(pos) > 4 or not ch:
            fail(f"--pin {raw!r}: expected POS=CHAR with a position from 0, e.g. --pin 0=福")
        position = int(pos)
        if position in found:
            fail(f"--pin: two pins at position {position} ({found[position]} and {ch})")
        found[position] = ch
    if head is not None:
        if len(head) != 1:
            fail(f"--head {head!r}: one character (藏头 pins the answer's first character)")
        if found.get(0, head) != head:
            fail(f"--head {head} and --pin 0={found[0]} both pin position 0")
        found[0] = head
    return found


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


def _answer_stream(predictor, chunks: Iterator[list[str]], top_k: int, constrained: bool, tone: bool, as_json: bool,
                   studio: dict | None = None) -> int:
    """Answer lines in chunks; `studio` (direction, pins, alternatives) goes to every line. Plain requests are
    batched (`match_batch`); with pins or alternatives each line is answered on its own."""
    from couplet.predictor import InputError

    studio = studio or {}
    direction = studio.get("direction", "down")
    per_line = bool(studio.get("pins") or studio.get("alternatives"))
    bad = 0
    for chunk in chunks:
        if per_line:
            results = []
            for line in chunk:
                try:
                    results.append(predictor.match(line, top_k=top_k, constrained=constrained, tone=tone, **studio))
                except InputError as exc:
                    results.append(exc)
        else:
            try:
                extra = {"direction": direction} if direction != "down" else {}
                results = predictor.match_batch(chunk, top_k=top_k, constrained=constrained, tone=tone, errors="return", **extra)
            except InputError as exc:  # a direction this model cannot answer: every line would fail the same way
                fail(str(exc))
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


def _interactive(predictor, top_k: int, constrained: bool, tone: bool, as_json: bool, studio: dict | None = None) -> None:
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
    studio = studio or {}
    reverse = studio.get("direction") == "up"
    given, answer = ("下联", "上联") if reverse else ("上联", "下联")
    typer.echo(f"couplet: model {predictor.model_id}; type {'a lower' if reverse else 'an upper'} line ({given}), Ctrl-D leaves.", err=True)
    try:
        while True:
            try:
                line = input(f"{given}> ")
            except EOFError:
                typer.echo("", err=True)
                break
            except KeyboardInterrupt:
                typer.echo("", err=True)
                break
            if not line.strip():
                continue
            try:
                result = predictor.match(line, top_k=top_k, constrained=constrained, tone=tone, **studio)
            except InputError as exc:
                typer.echo(f"error: {exc}")
                continue
            _print_answer(result, top_k, as_json, prefix=f"{answer}: ")
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
    reverse: bool = typer.Option(False, "--reverse", help="The other direction: the given line is a lower line (下联), the answer an upper line (上联); the tone rule is mirrored. Needs a model trained with model.directions=2."),
    pin: list[str] = typer.Option([], "--pin", metavar="POS=CHAR", help="Force CHAR at position POS of the answer (from 0); repeatable. A rule the pin forbids gives way (named in relaxed); an impossible pin is an error."),
    head: Optional[str] = typer.Option(None, "--head", metavar="CHAR", help="藏头: the answer starts with CHAR (the same as --pin 0=CHAR)."),
    alternatives: int = typer.Option(0, "--alternatives", metavar="N", help="Also show, for each position of the best answer, up to N (0..20) other characters that keep the whole line a valid couplet, with the line's score (--file/stdin: with --json)."),
    blocklist: Optional[Path] = typer.Option(None, "--blocklist", metavar="PATH", help="A word list (UTF-8, one word per line, '#' comments) added to the model's: no answer contains these words, and a line containing one is refused."),
) -> None:
    """Answer an upper line (上联) with a lower line (下联), or with --reverse a lower line with an upper line.

    With an argument: one answer. With --file or piped stdin: one output line per input line (a bad
    line gets an `error: ...` line). Otherwise an interactive prompt (history in $COUPLET_HOME/.couplet_history).
    --pin, --head and --alternatives apply to every line.
    """
    from couplet.predictor import InputError
    from couplet.serving.schemas import ALTERNATIVES_MAX

    constrained = not unconstrained
    if upper is not None and file is not None:
        fail("give either an upper line or --file, not both")
    if not 0 <= alternatives <= ALTERNATIVES_MAX:
        fail(f"--alternatives must be from 0 to {ALTERNATIVES_MAX}, got {alternatives}")
    pins = _parse_pins(pin, head)
    studio: dict = {}
    if reverse:
        studio["direction"] = "up"
    if pins:
        studio["pins"] = pins
    if alternatives:
        studio["alternatives"] = alternatives
    if upper is not None:
        predictor = _load_predictor(model, blocklist=blocklist)
        try:
            result = predictor.match(upper, top_k=top_k, constrained=constrained, tone=tone, **studio)
        except InputError as exc:
            fail(str(exc))
        _print_answer(result, top_k, as_json)
        return
    if alternatives and not as_json and (file is not None or sys.stdin is None or not sys.stdin.isatty()):
        fail("--alternatives with --file or stdin needs --json (one JSON object per line)")
    if file is not None and str(file) != "-":
        if not file.is_file():
            fail(f"file not found: {file}")
        try:
            text = file.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            fail(f"{file} is not UTF-8 text (byte {exc.start})")
        predictor = _load_predictor(model, batch=True, blocklist=blocklist)
        _answer_stream(predictor, _chunks(text.split("\n")), top_k, constrained, tone, as_json, studio)
        return
    stdin = sys.stdin
    if file is not None or stdin is None or not stdin.isatty():
        predictor = _load_predictor(model, batch=True, blocklist=blocklist)
        _answer_stream(predictor, _stream_chunks(stdin), top_k, constrained, tone, as_json, studio)
        return
    predictor = _load_predictor(model, blocklist=blocklist)
    _interactive(predictor, top_k, constrained, tone, as_json, studio)


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
