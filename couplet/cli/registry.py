"""`couplet champion show` and `couplet champion set <run-id> --force`: the champion model of
`models/registry.json` (the rule that picks it is in couplet/registry.py)."""

from __future__ import annotations

import json

import typer

from couplet.cli import app, fail

champion = typer.Typer(
    help="Show or set the champion: the model `couplet match` and `couplet serve` load by default.",
    no_args_is_help=True,
)
app.add_typer(champion, name="champion")


@champion.command("show")
def show() -> None:
    """Print the champion with its test metrics, and the last 10 promotion decisions."""
    from couplet.core.config import couplet_home
    from couplet.registry import RegistryError, read_registry

    try:
        registry = read_registry(couplet_home())
    except RegistryError as exc:
        fail(str(exc), code=1)
    typer.echo(f"champion {registry['champion'] or '-'}  {json.dumps(registry.get('champion_metrics') or {}, ensure_ascii=False)}")
    for r in registry["history"][-10:]:
        typer.echo(f"{r['time']}  {r['run_id']}  {'PROMOTED' if r['promoted'] else 'kept    '}  {r['reason']}")


@champion.command("set")
def set_champion(
    run_id: str = typer.Argument(..., help="A folder name under $COUPLET_HOME/models/ that the pipeline has evaluated."),
    force: bool = typer.Option(False, "--force", help="Required: you are overriding the promotion rule."),
    reason: str = typer.Option("promoted by hand", "--reason", help="Recorded with the decision in registry.json."),
) -> None:
    """Make a model champion regardless of the promotion rule (e.g. one scored on a new test split)."""
    from couplet.core.config import couplet_home
    from couplet.registry import RegistryError, force_promote

    if not force:
        fail("setting the champion by hand overrides the promotion rule: add --force")
    try:
        record = force_promote(run_id, couplet_home(), reason)
    except RegistryError as exc:
        fail(str(exc), code=1)
    typer.echo(f"champion is now {record['run_id']} (was {record['champion_before'] or 'none'})")
