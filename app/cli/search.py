"""``dermris search``: rank a store's images against an image or a stored row."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dermris.retriever.measures import DICE_MEASURES, MEASURES

from ._common import DEVICES, command, log, main, print_results, print_stats


@command(main, "search")
@click.argument("store", type=click.Path(path_type=Path))
@click.argument("image", required=False, type=click.Path(path_type=Path))
@click.option(
    "--row", type=click.IntRange(min=0), help="Query with a stored row instead of an image."
)
@click.option("-k", "k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option(
    "--measure",
    "measures",
    multiple=True,
    type=click.Choice(MEASURES),
    help="A measure (repeatable); default: all nine.",
)
@click.option("--all", "all_measures", is_flag=True, help="All nine measures (the default).")
@click.option(
    "--where", help="Only return images whose metadata pass, e.g. \"diagnosis == 'melanoma'\"."
)
@click.option(
    "--column",
    "columns",
    multiple=True,
    help="A metadata column to show with every hit (repeatable).",
)
@click.option(
    "--exclude", "exclude", multiple=True, type=click.IntRange(min=0), help="A row never to return."
)
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@click.option(
    "--sheet", type=click.Path(dir_okay=False, path_type=Path), help="Write a contact sheet PNG."
)
@click.option(
    "--image-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Where the indexed image folder is now, if it moved (for --sheet).",
)
@click.option(
    "--stats", is_flag=True, help="Also print rows re-ranked, bytes read and time per stage."
)
@click.option(
    "--explain",
    is_flag=True,
    help=(
        "Per hit, the style stages that make up most of the style loss; lesion outlines on --sheet."
    ),
)
@click.option("--device", type=DEVICES, default="auto", show_default=True)
def search_cmd(
    store,
    image,
    row,
    k,
    measures,
    all_measures,
    where,
    columns,
    exclude,
    as_json,
    sheet,
    image_root,
    stats,
    explain,
    device,
):
    """Rank the images of STORE by similarity to IMAGE (or to a stored --row).

    ED_max and LS_max are maxima over the whole store, also with --where.
    """
    from dermris.retriever import Retriever

    if (image is None) == (row is None):
        raise click.UsageError("give either IMAGE or --row")
    if all_measures or not measures:
        measures = MEASURES
    retriever = Retriever.open(store, device=device)
    query = image if image is not None else row
    result = retriever.search(
        query,
        measures=measures,
        k=k,
        where=where,
        columns=columns,
        exclude=exclude,
        explain=explain,
    )
    if image is not None:
        query_source, query_name = image, str(image)
    else:
        query_source = retriever.locate(retriever.paths[row], image_root)
        query_name = f"row {row} ({retriever.image_ids[row]})"
    if sheet is not None:
        from dermris.app.sheet import contact_sheet

        contact_sheet(
            query_source,
            result,
            sheet,
            query_label=Path(str(query_source)).stem,
            resolve=lambda p: retriever.locate(p, image_root),
        )
    if as_json:
        payload = {
            "store": str(store),
            "k": k,
            "where": where,
            **result.to_dict(stats=stats),
            "query": query_name,
            "segmenter_trained": retriever.segmenter_trained,
        }
        if sheet is not None:
            payload["sheet"] = str(sheet)
        click.echo(json.dumps(payload, indent=1))
        _warn_untrained(retriever, measures)
        return
    click.echo(
        f"query: {query_name}   store: {store} ({len(retriever)} rows)"
        + (f"   where: {where}" if where else "")
    )
    print_results(result)
    if stats:
        print_stats(result.stats)
    if sheet is not None:
        click.echo(f"\ncontact sheet: {sheet}")
    _warn_untrained(retriever, measures)


def _warn_untrained(retriever, measures) -> None:
    """One warning line (after the results: an error stays the only line) when a Dice-based
    measure was asked of a store whose segmenter is untrained."""
    dice_based = [m for m in measures if m in DICE_MEASURES]
    if dice_based and not retriever.segmenter_trained:
        log.warning(
            "%s: the Dice part of these scores is noise, the store's masks come from an "
            "untrained segmenter (train one: dermris train segmenter; see docs/models.md)",
            ", ".join(dice_based),
        )
