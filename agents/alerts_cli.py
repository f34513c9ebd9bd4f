"""``kpi alerts``: the KPI threshold alerts of ``alerts.yaml`` as Prometheus rules."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from agents.alerts import AlertsConfigError, load_config, render_yaml


@click.group()
def alerts() -> None:
    """KPI threshold alerts: alerts.yaml -> Prometheus recording and alerting rules."""


@alerts.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("alerts.yaml"),
    show_default=True,
    help="The thresholds and pipeline alert settings",
)
@click.option(
    "--output",
    default="-",
    show_default=True,
    help="Rule file to write, or - for stdout (e.g. prometheus/rules/kpi-alerts.yml)",
)
def render(config_path: Path, output: str) -> None:
    """Render the Prometheus rule file of the alerts config."""
    try:
        config = load_config(config_path)
    except AlertsConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    text = render_yaml(config, source=config_path.name)
    if output == "-":
        sys.stdout.write(text)
    else:
        Path(output).write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}", err=True)
