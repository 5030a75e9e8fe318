"""The `couplet` command line. Each command lives in a small module that registers itself on `app`."""

from __future__ import annotations

import importlib
import sys

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
    "couplet.cli_pipeline",  # run, report
    "couplet.cli_model",  # match, evaluate
    "couplet.cli_serve",  # serve
]


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def main() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name)
    app()


if __name__ == "__main__":  # `python -m couplet.cli`: use the importable module's `app`
    from couplet.cli import main as _main

    sys.exit(_main())
