"""`git theta strategies`: every installed merge strategy (built in and from plugins) with its parameters."""

from __future__ import annotations

import click


@click.command("strategies")
@click.argument("names", nargs=-1)
@click.option("--markdown", is_flag=True, help="the docs page (docs/strategies.md is generated this way)")
def strategies_cmd(names: tuple[str, ...], markdown: bool) -> None:
    """List merge strategies: what each does, what it needs (base, statistics) and its --set parameters."""
    from gittheta_merge.merge import strategies

    click.echo((strategies.markdown if markdown else strategies.text)(list(names) or None), nl=False)
