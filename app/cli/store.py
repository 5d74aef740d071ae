"""The store commands: ``info``, ``check``, ``delete``, ``compact``, ``rebuild``. None of them
imports torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ._common import command, main

UNTRAINED_MASKS = (
    "masks from an untrained segmenter, the Dice part of i1_ed, i1_cd, i1_ecd and i1_sd is "
    "noise (train one: dermris train segmenter; see docs/models.md)"
)


@command(main, "info")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info_cmd(store, as_json):
    """Describe what STORE holds."""
    from dermris.indexer.store import Store
    from dermris.retriever.store_index import estimate_memory

    opened = Store.open(store)
    summary = opened.describe()
    memory = estimate_memory(opened)
    summary["retriever_bytes_per_row"] = memory["bytes_per_row"]
    summary["retriever_memory_bytes"] = memory["total_bytes"]
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if key == "segmenter_trained":
            value = "yes" if value else f"no: {UNTRAINED_MASKS}"
        elif isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value)) or "-"
        elif isinstance(value, dict):
            value = (
                ", ".join(f"{k}={v}" for k, v in value.items())
                or "not built (derived; rebuilt on open)"
            )
        click.echo(f"{key:<{width}}  {value}")


# -- maintenance -------------------------------------------------------------------------
@command(main, "rebuild")
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--sketch-dim",
    type=click.IntRange(min=0),
    default=256,
    show_default=True,
    help="Dimension of the style sketch (refitted when it changes).",
)
@click.option(
    "--faiss-files",
    is_flag=True,
    help="Also write (and from now on keep) FAISS files of the features in STORE/faiss.",
)
def rebuild_cmd(store, sketch_dim, faiss_files):
    """Rebuild STORE's derived data (style sketch; FAISS files when kept) from its arrays."""
    from dermris.indexer.store import StoreWriter

    with StoreWriter.open(store) as writer:
        writer.build_derived(sketch_dim=sketch_dim, faiss_files=faiss_files, rewrite=True)
        sketch = writer.reader().sketch_info
        rows = writer.rows
        kept = writer.keeps_faiss_files
    click.echo(
        f"rebuilt the style sketch (d={sketch.dim}, fitted on {sketch.fitted_rows} rows)"
        + (" and FAISS files" if kept else "")
        + f" for {rows} rows"
    )


@command(main, "delete")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--id", "ids", multiple=True, help="Image id to delete (repeatable).")
@click.option(
    "--ids-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A file with one image id per line.",
)
@click.option(
    "--missing-ok", is_flag=True, help="Skip ids that are not in the store instead of refusing."
)
def delete_cmd(store, ids, ids_file, missing_ok):
    """Delete images from STORE: no search returns them from now on (compact frees the space).

    All or nothing: an id that is not in the store refuses the whole deletion (exit 1, nothing
    deleted) unless --missing-ok.
    """
    from dermris.indexer.store import StoreWriter

    wanted = list(ids)
    if ids_file is not None:
        wanted += [
            line.strip() for line in ids_file.read_text("utf-8").splitlines() if line.strip()
        ]
    if not wanted:
        raise click.UsageError("give --id or --ids-file")
    with StoreWriter.open(store) as writer:
        rows, unknown = writer.delete(wanted, missing_ok=missing_ok)
    click.echo(f"deleted {len(rows)} images; run `dermris compact {store}` to remove their data")
    for image_id in unknown:
        click.echo(f"  not in the store (or already deleted), skipped: {image_id}")


@command(main, "compact")
@click.argument("store", type=click.Path(path_type=Path))
def compact_cmd(store):
    """Physically remove deleted images from STORE's arrays, metadata and indexes."""
    from dermris.indexer.store import StoreWriter, compact

    with StoreWriter.open(store) as writer:
        removed = compact(writer)
        rows = writer.rows
    click.echo(f"removed {removed} rows; store has {rows} rows")


@command(main, "check")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--full", is_flag=True, help="Also read every style row (checks every checksum).")
@click.option("--json", "as_json", is_flag=True)
def check_cmd(store, full, as_json):
    """Verify STORE; print each problem on one line (exit code 1 when any)."""
    from dermris.indexer.store import check_store

    report = check_store(store, full=full)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        for problem in report.problems:
            click.echo(problem)
        if report.ok:
            click.echo(f"ok: {report.rows} rows; checked {'; '.join(report.checked)}")
    if not report.ok:
        sys.exit(1)
