"""The `couplet` command line. Each command lives in a small module of this package that registers
itself on `app`: pipeline.py (run, report), model.py (match, evaluate), serve.py (serve),
registry.py (champion show|set)."""

from __future__ import annotations

import importlib
import logging

import typer

app = typer.Typer(
    name="couplet",
    help="Chinese couplet (对联) robot: data pipeline, training, evaluation and serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules that define commands with `@app.command()`; imported lazily so `couplet --help` stays fast.
COMMAND_MODULES = [
    "couplet.cli.pipeline",  # run, report
    "couplet.cli.model",  # match, evaluate
    "couplet.cli.serve",  # serve
    "couplet.cli.registry",  # champion show | champion set
]


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _console_notices() -> None:
    """The library's notices (logger `couplet`: resuming, an ignored checkpoint) go to stderr as plain lines."""
    logger = logging.getLogger("couplet")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # Prefect's own console handler would print them a second time


def main() -> None:
    _console_notices()
    for name in COMMAND_MODULES:
        importlib.import_module(name)
    app()
