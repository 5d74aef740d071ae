"""``dermris demo``: an offline end-to-end run on synthetic lesions."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dermris.models.presets import list_presets

from ._common import command, main, print_results, progress


@command(main, "demo")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("dermris-demo"),
    show_default=True,
    help="Folder for the generated images, the store and the sheet.",
)
@click.option(
    "--per-class",
    type=click.IntRange(min=2),
    default=8,
    show_default=True,
    help="Synthetic images per texture class (4 classes).",
)
@click.option("-k", "k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option(
    "--preset",
    type=click.Choice(list_presets()),
    default=None,
    help=(
        "Model preset [default: the best installed: lite0 when its weights are installed, "
        "else tiny]."
    ),
)
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
def demo_cmd(out, per_class, k, preset, as_json):
    """Generate synthetic lesions, index them, run one query, write a contact sheet."""
    from dermris.app.demo import run_demo

    result = run_demo(
        out, per_class=per_class, k=k, preset=preset, progress=progress() and not as_json
    )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "store": str(result.store),
                    "preset": result.preset,
                    "model": result.model_description,
                    "query": str(result.query),
                    "query_texture": result.query_texture,
                    "sheet": str(result.sheet),
                    "results": result.results.to_dict(stats=False)["results"],
                },
                indent=1,
            )
        )
        return
    click.echo(f"model: {result.model_description}")
    click.echo(f"indexed {result.rows} synthetic images into {result.store}")
    click.echo(f"query: {result.query} (texture {result.query_texture}, not in the store)")
    print_results(result.results)
    click.echo(f"\ncontact sheet: {result.sheet}")
