"""``dermris search``: rank a store's images against an image or a stored row, several images of
one lesion (``--lesion``), one hit per group (``--group-by lesion_id``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dermris.retriever.measures import DICE_MEASURES, MEASURES

from ._common import DEVICES, command, log, main, print_results, print_stats


@command(main, "search")
@click.argument("store", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--row",
    "rows",
    multiple=True,
    type=click.IntRange(min=0),
    help="Query with a stored row instead of an image (repeatable with --lesion).",
)
@click.option(
    "--lesion",
    is_flag=True,
    help=(
        "The images and --row rows are views of one lesion, asked as one query: each measure's "
        "score is the mean over them; their own rows are not returned."
    ),
)
@click.option(
    "--lesion-of",
    metavar="COLUMN=VALUE",
    help="A lesion query of every stored row whose COLUMN is VALUE (e.g. lesion_id=IL_0001).",
)
@click.option(
    "--group-by",
    metavar="COLUMN",
    help="One hit per group of rows sharing COLUMN (e.g. lesion_id): its best row, the others "
    "listed as members; null values are groups of their own.",
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
    "--where",
    help="Only return images whose metadata pass, e.g. \"diagnosis == 'melanoma' and age > 50\" "
    "or \"diagnosis = 'melanoma' AND age > 50\" (docs/filters.md).",
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
    images,
    rows,
    lesion,
    lesion_of,
    group_by,
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

    Several IMAGES and --row rows with --lesion (or --lesion-of COLUMN=VALUE) are one lesion
    query. ED_max and LS_max are maxima over the whole store (per query image), also with
    --where.
    """
    from dermris.retriever import LesionQuery, Retriever

    given = len(images) + len(rows)
    if lesion_of is not None:
        if given:
            raise click.UsageError("--lesion-of takes no IMAGE or --row")
        column, sep, value = lesion_of.partition("=")
        if not sep or not column:
            raise click.UsageError("--lesion-of takes COLUMN=VALUE, e.g. lesion_id=IL_0001")
        lesion = True
    elif not given:
        raise click.UsageError("give either IMAGE or --row (or --lesion-of)")
    elif given > 1 and not lesion:
        raise click.UsageError(
            "several images or rows: add --lesion to ask them as one lesion query"
        )
    if explain and lesion:
        raise click.UsageError("--explain is not available for lesion queries")
    if all_measures or not measures:
        measures = MEASURES
    retriever = Retriever.open(store, device=device)
    if lesion_of is not None:
        rows = tuple(retriever.group_rows(column, _typed(retriever, column, value)))
    items: list = [*images, *rows]
    query = LesionQuery(items) if lesion else items[0]
    image = images[0] if images else None
    row = rows[0] if rows else None
    result = retriever.search(
        query,
        measures=measures,
        k=k,
        where=where,
        columns=columns,
        exclude=exclude,
        explain=explain,
        group_by=group_by,
    )
    if image is not None:
        query_source, query_name = image, str(image)
    else:
        query_source = retriever.locate(retriever.paths[row], image_root)
        query_name = f"row {row} ({retriever.image_ids[row]})"
    if lesion:
        query_name = f"lesion of {len(items)} image(s): " + ", ".join(
            str(i) if not isinstance(i, int) else f"row {i}" for i in items
        )
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
            "group_by": group_by,
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


def _typed(retriever, column: str, value: str):
    """``value`` (text from the command line) as the type of ``column``."""
    import pyarrow as pa

    from dermris.core.errors import QueryError

    if column not in retriever.metadata_columns:
        raise QueryError(f"unknown metadata column {column!r}")
    kind = retriever.store.metadata_schema().field(column).type
    try:
        if pa.types.is_integer(kind):
            return int(value)
        if pa.types.is_floating(kind):
            return float(value)
    except ValueError:
        raise QueryError(f"{column} holds numbers, not {value!r}") from None
    return value
