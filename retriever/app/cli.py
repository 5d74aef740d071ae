"""The ``dermris`` command line: parses arguments, calls the library, prints results.

Results go to stdout (``--json`` for machines); progress bars, warnings and diagnostics go to
stderr (``-v`` for more, ``-q`` for none but errors). dermris's own errors (and errors of the
operating system, such as a full disk) become one line on stderr and exit code 1; usage
errors exit with 2. Anything else is a bug and keeps its traceback.

Nothing heavy is imported at module level: ``dermris --help`` and argument errors never load
torch.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from dermris.models.errors import DermrisError
from dermris.models.presets import list_presets

from ..measures import COMPONENTS, MEASURES

__all__ = ["main"]

log = logging.getLogger("dermris")

_DEVICES = click.Choice(["auto", "cpu", "cuda"])


class _Settings:
    quiet = False


def _configure_logging(verbose: int, quiet: bool) -> None:
    """Diagnostics to stderr: WARNING by default, INFO with -v, DEBUG with -vv, ERROR with -q."""
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logger = logging.getLogger("dermris")
    logger.setLevel(level)
    if not any(getattr(h, "_dermris", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        handler._dermris = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    for handler in logger.handlers:
        if getattr(handler, "_dermris", False):
            handler.setStream(sys.stderr)  # click's test runner swaps sys.stderr per invocation
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.setLevel(level)
    if not warnings_logger.handlers:
        warnings_logger.addHandler(logger.handlers[-1])
    _Settings.quiet = quiet


def _progress() -> bool:
    """Whether progress bars are shown (not with --quiet)."""
    return not _Settings.quiet


def _command(group: click.Group, name: str, **kwargs):
    """Register a command with the options every command has (-v/--verbose, -q/--quiet), and
    turn dermris errors into one-line messages."""

    def decorate(func):
        @group.command(name, **kwargs)
        @click.option("-v", "--verbose", count=True, help="More diagnostics on stderr (-vv: debug).")
        @click.option("-q", "--quiet", is_flag=True, help="No progress bars; only errors on stderr.")
        @functools.wraps(func)
        def wrapper(*args, verbose: int, quiet: bool, **kw):
            _configure_logging(verbose, quiet)
            try:
                return func(*args, **kw)
            except DermrisError as exc:
                raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
            except OSError as exc:  # the environment (disk full, permissions), not a bug
                where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
                raise click.ClickException(f"{exc.strerror or exc}{where}") from None

        return wrapper

    return decorate


def _print_results(results, *, file=None, explanation=None) -> None:
    comp_header = "".join(f"{c:>8}" for c in COMPONENTS)
    columns = []
    for hits in results.values():
        for hit in hits:
            columns = list(hit.metadata)
            break
    for measure, hits in results.items():
        click.echo(f"\n{measure}", file=file)
        meta_header = "".join(f"  {c[:16]:<16}" for c in columns)
        click.echo(f"  {'#':>2} {'row':>6}  {'image_id':<28}{'score':>9}{comp_header}{meta_header}", file=file)
        for i, hit in enumerate(hits, start=1):
            comps = "".join(
                f"{hit.components[c]:8.4f}" if c in hit.components else f"{'-':>8}" for c in COMPONENTS
            )
            meta = "".join(f"  {str(hit.metadata.get(c))[:16]:<16}" for c in columns)
            click.echo(f"  {i:>2} {hit.row:>6}  {hit.image_id[:27]:<28}{hit.score:9.4f}{comps}{meta}", file=file)
            if explanation is not None:
                from ..explain import stage_summary

                shares = " · ".join(f"stage {s.stage + 1} {100 * s.share:.0f}%" for s in stage_summary(explanation, hit))
                click.echo(f"{'':>12}style loss from: {shares or '- (the same style)'}", file=file)


def _print_stats(stats) -> None:
    click.echo(f"\nstats: {stats.rows} rows; style rows read {stats.style_rows_read}, "
               f"mask rows read {stats.mask_rows_read}, {stats.bytes_read / 1e6:.2f} MB read")
    click.echo("  rows re-ranked exactly: " + ", ".join(f"{m} {n}" for m, n in stats.reranked.items()))
    click.echo("  seconds: " + ", ".join(f"{s} {t:.4f}" for s, t in stats.seconds.items()))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dermris")
def main() -> None:
    """dermris: content-based image retrieval for dermoscopy (style, Dice and I1 scores)."""


# -- index, search, info -----------------------------------------------------------------
def _cluster_option(ctx, param, value):
    """Validate --cluster without importing dask (a malformed value is a usage error)."""
    if value is None:
        return None
    from dermris.indexer.cluster import parse_cluster

    try:
        return parse_cluster(value)
    except DermrisError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@_command(main, "index")
@click.argument("images", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--metadata", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV with one row per image (isic-cli export, ISIC challenge CSV, ...).")
@click.option("--id-column", help="Image id column of the CSV (default: isic_id, image_name, image_id, image).")
@click.option("--preset", type=click.Choice(list_presets()), default=None,
              help="Model preset for a new store [default: tiny].")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A dermris weights file (safetensors with config); overrides --preset.")
@click.option("--backbone-weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Local timm checkpoint for the backbone (safetensors or weights-only .pth).")
@click.option("--pretrained", is_flag=True, help="Use timm's pretrained hub weights (needs a network).")
@click.option("--device", type=_DEVICES, default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--commit-every", type=click.IntRange(min=1), default=256, show_default=True,
              help="Rows per commit; an interrupted run keeps every committed row.")
@click.option("--sketch-dim", type=click.IntRange(min=0), default=256, show_default=True,
              help="Dimension of the style sketch used to bound style losses.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decoding processes [default: all cores but one, at most 16; 0: decode in the main process].")
@click.option("--precision", type=click.Choice(["auto", "float32", "tf32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Model precision on CUDA (auto: float32; the others trade exactness of "
                                      "the rankings for speed, see the README).")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model (long runs on CUDA).")
@click.option("--cluster", callback=_cluster_option, metavar="local[:N]|cuda[:N]|tcp://HOST:PORT|FILE.json",
              help="Embed on a Dask cluster: N local worker processes, one worker per GPU, an existing "
                   "scheduler, or its scheduler file [default: this process].")
@click.option("--block-size", type=click.IntRange(min=1), default=None,
              help="Files per cluster task [default: whole style shards, at least 256 files].")
@click.option("--strict", is_flag=True, help="Exit with code 3 when any file was rejected.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
def index_cmd(images, store, metadata, id_column, preset, weights, backbone_weights, pretrained,
              device, batch_size, commit_every, sketch_dim, workers, precision, compile_model, cluster, block_size,
              strict, as_json):
    """Index the images under IMAGES into STORE (created, or extended with new images)."""
    from dermris.indexer import index_folder

    if block_size is not None and cluster is None:
        raise click.UsageError("--block-size needs --cluster")
    report = index_folder(
        images, store, preset=preset, weights=weights, backbone_weights=backbone_weights,
        pretrained=pretrained, metadata=metadata, id_column=id_column, device=device,
        batch_size=batch_size, commit_every=commit_every, sketch_dim=sketch_dim, workers=workers,
        precision=precision, compile=compile_model, progress=_progress(), cluster=cluster, block_size=block_size,
    )
    if report.without_metadata:
        shown = ", ".join(report.without_metadata[:5])
        log.warning("%d images have no row in the metadata CSV (metadata left empty): %s%s",
                    len(report.without_metadata), shown, " ..." if len(report.without_metadata) > 5 else "")
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        ran = report.cluster
        on_cluster = f"; {ran.get('workers')} Dask workers, {ran.get('blocks')} blocks" if ran else ""
        click.echo(
            f"indexed {report.indexed}, already in store {report.already_indexed}, "
            f"duplicates {len(report.duplicates)}, rejected {len(report.rejected)}, "
            f"previously deleted {len(report.previously_deleted)}; "
            f"store has {report.rows} rows ({report.seconds:.1f} s on {report.device}, {report.precision}{on_cluster})"
        )
        for path, same in report.duplicates:
            click.echo(f"  duplicate: {path} (same bytes as {same})")
        for path, reason in report.rejected:
            click.echo(f"  rejected: {path}: {reason}")
        for path in report.previously_deleted:
            click.echo(f"  previously deleted, not re-added: {path}")
    if strict and report.rejected:
        sys.exit(3)


@_command(main, "search")
@click.argument("store", type=click.Path(path_type=Path))
@click.argument("image", required=False, type=click.Path(path_type=Path))
@click.option("--row", type=click.IntRange(min=0), help="Query with a stored row instead of an image.")
@click.option("-k", "k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--measure", "measures", multiple=True, type=click.Choice(MEASURES),
              help="A measure (repeatable); default: all nine.")
@click.option("--all", "all_measures", is_flag=True, help="All nine measures (the default).")
@click.option("--where", help="Only return images whose metadata pass, e.g. \"diagnosis == 'melanoma'\".")
@click.option("--column", "columns", multiple=True, help="A metadata column to show with every hit (repeatable).")
@click.option("--exclude", "exclude", multiple=True, type=click.IntRange(min=0), help="A row never to return.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@click.option("--sheet", type=click.Path(dir_okay=False, path_type=Path), help="Write a contact sheet PNG.")
@click.option("--image-root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Where the indexed image folder is now, if it moved (for --sheet).")
@click.option("--stats", is_flag=True, help="Also print rows re-ranked, bytes read and time per stage.")
@click.option("--explain", is_flag=True,
              help="Per hit, the style stages that make up most of the style loss; lesion outlines on --sheet.")
@click.option("--device", type=_DEVICES, default="auto", show_default=True)
def search_cmd(store, image, row, k, measures, all_measures, where, columns, exclude, as_json, sheet, image_root,
               stats, explain, device):
    """Rank the images of STORE by similarity to IMAGE (or to a stored --row).

    ED_max and LS_max are maxima over the whole store, also with --where.
    """
    from ..search import Retriever

    if (image is None) == (row is None):
        raise click.UsageError("give either IMAGE or --row")
    if all_measures or not measures:
        measures = MEASURES
    retriever = Retriever.open(store, device=device)
    query = image if image is not None else row
    vectors = None
    if explain:  # the query's vectors, computed once for the search and the explanation
        vectors = retriever.embed(image) if image is not None else retriever.vectors(row)
        query = vectors  # a stored row's vectors carry the row: still excluded from its results
    result = retriever.search(query, measures=measures, k=k, where=where, columns=columns, exclude=exclude)
    why = None
    if explain:
        from ..explain import explain_result

        why = explain_result(retriever, vectors, result)
    if image is not None:
        query_source, query_name = image, str(image)
    else:
        query_source = retriever.locate(retriever.paths[row], image_root)
        query_name = f"row {row} ({retriever.image_ids[row]})"
    if sheet is not None:
        from .sheet import contact_sheet

        contact_sheet(query_source, result, sheet, query_label=Path(str(query_source)).stem,
                      resolve=lambda p: retriever.locate(p, image_root), explanation=why)
    if as_json:
        payload = {"store": str(store), "query": query_name, "k": k, "where": where,
                   "results": {m: [h.to_dict() for h in hits] for m, hits in result.items()}}
        if why is not None:
            for hits in payload["results"].values():
                for hit in hits:
                    hit["style_stages"] = [s.to_dict() for s in why.stages[hit["row"]]]
        if sheet is not None:
            payload["sheet"] = str(sheet)
        if stats:
            payload["stats"] = result.stats.to_dict()
        click.echo(json.dumps(payload, indent=1))
        return
    click.echo(f"query: {query_name}   store: {store} ({len(retriever)} rows)" + (f"   where: {where}" if where else ""))
    _print_results(result, explanation=why)
    if stats:
        _print_stats(result.stats)
    if sheet is not None:
        click.echo(f"\ncontact sheet: {sheet}")


@_command(main, "info")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info_cmd(store, as_json):
    """Describe what STORE holds."""
    from dermris.indexer.store import Store

    summary = Store.open(store).describe()
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value)) or "-"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "not built (derived; rebuilt on open)"
        click.echo(f"{key:<{width}}  {value}")


# -- maintenance -------------------------------------------------------------------------
@_command(main, "rebuild")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--sketch-dim", type=click.IntRange(min=0), default=256, show_default=True,
              help="Dimension of the style sketch (refitted when it changes).")
def rebuild_cmd(store, sketch_dim):
    """Rebuild STORE's derived data (FAISS indexes, style sketch) from its arrays."""
    from dermris.indexer.store import StoreWriter

    with StoreWriter.open(store) as writer:
        writer.build_derived(sketch_dim=sketch_dim)
        sketch = writer.reader().sketch_info
        rows = writer.rows
    click.echo(f"rebuilt FAISS indexes and style sketch (d={sketch.dim}, fitted on "
               f"{sketch.fitted_rows} rows) for {rows} rows")


@_command(main, "delete")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--id", "ids", multiple=True, help="Image id to delete (repeatable).")
@click.option("--ids-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file with one image id per line.")
@click.option("--missing-ok", is_flag=True, help="Skip ids that are not in the store instead of refusing.")
def delete_cmd(store, ids, ids_file, missing_ok):
    """Delete images from STORE: no search returns them from now on (compact frees the space).

    All or nothing: an id that is not in the store refuses the whole deletion (exit 1, nothing
    deleted) unless --missing-ok.
    """
    from dermris.indexer.store import StoreWriter

    wanted = list(ids)
    if ids_file is not None:
        wanted += [line.strip() for line in ids_file.read_text("utf-8").splitlines() if line.strip()]
    if not wanted:
        raise click.UsageError("give --id or --ids-file")
    with StoreWriter.open(store) as writer:
        rows, unknown = writer.delete(wanted, missing_ok=missing_ok)
    click.echo(f"deleted {len(rows)} images; run `dermris compact {store}` to remove their data")
    for image_id in unknown:
        click.echo(f"  not in the store (or already deleted), skipped: {image_id}")


@_command(main, "compact")
@click.argument("store", type=click.Path(path_type=Path))
def compact_cmd(store):
    """Physically remove deleted images from STORE's arrays, metadata and indexes."""
    from dermris.indexer.store import StoreWriter

    with StoreWriter.open(store) as writer:
        removed = writer.compact()
        rows = writer.rows
    click.echo(f"removed {removed} rows; store has {rows} rows")


@_command(main, "check")
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


# -- evaluation --------------------------------------------------------------------------
@_command(main, "evaluate")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--label-column", required=True, help="Metadata column with the label (e.g. diagnosis_1, target).")
@click.option("--group-column", help="Exclude results sharing the query's value here (patient_id, lesion_id).")
@click.option("-k", "k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--queries", type=click.IntRange(min=1), default=50, show_default=True,
              help="Labelled rows sampled as queries.")
@click.option("--all", "all_rows", is_flag=True, help="Use every labelled row as a query.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--measures", "measures", multiple=True, type=click.Choice(MEASURES), help="Default: all nine.")
@click.option("--bootstrap", type=click.IntRange(min=0), default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Bar chart PNG.")
@click.option("--device", type=_DEVICES, default="auto", show_default=True)
def evaluate_cmd(store, label_column, group_column, k, queries, all_rows, seed, measures, bootstrap, as_json,
                 plot, device):
    """Leave-one-out evaluation of the measures by labels (Table 1, automatically)."""
    from ..search import Retriever
    from .evaluate import evaluate, plot_report

    report = evaluate(Retriever.open(store, device=device), label_column, group_column=group_column, k=k,
                      queries=None if all_rows else queries, seed=seed, measures=measures or MEASURES,
                      bootstrap=bootstrap)
    if plot is not None:
        plot_report(report, plot)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
        return
    pct = int(report.confidence * 100)
    click.echo(f"{len(report.queries)} queries, k={k}, label {label_column!r}"
               + (f", same {group_column!r} excluded" if group_column else "") + f"; [{pct} % bootstrap CI]")
    click.echo(f"{'measure':<10} {'precision@' + str(k):>24} {'mAP@' + str(k):>24} {'MV acc@' + str(k):>24}")
    for m, metrics in report.metrics.items():
        cells = "".join(f"{s.mean:>8.3f} [{s.low:.3f}, {s.high:.3f}]" for s in
                        (metrics["precision"], metrics["map"], metrics["majority_vote"]))
        click.echo(f"{m:<10} {cells}")
    if plot is not None:
        click.echo(f"plot: {plot}")


@_command(main, "judge")
@click.argument("store", required=False, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Session folder.")
@click.option("--queries", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-k", "k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the page binds to.")
@click.option("--port", type=click.IntRange(min=1, max=65535), default=8765, show_default=True)
@click.option("--token", default=None, help="Access token required on every request [default: $DERMRIS_TOKEN].")
@click.option("--allowed-host", "extra_hosts", multiple=True,
              help="Another name the page is reached by (e.g. a DNS name; repeatable).")
@click.option("--no-serve", is_flag=True, help="Only prepare the session.")
@click.option("--score", "score_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Score the judgments in this session folder instead.")
@click.option("--rater", default=None, help="With --score: only this rater's judgments.")
@click.option("--json", "as_json", is_flag=True)
def judge_cmd(store, out, queries, seed, k, host, port, token, extra_hosts, no_serve, score_dir, rater, as_json):
    """Blinded manual judgment (paper 4.1): prepare and serve a session, or --score it."""
    from . import judge

    if score_dir is not None:
        score = judge.score_session(score_dir, rater=rater)
        if as_json:
            click.echo(json.dumps(score.to_dict(), indent=1))
            return
        raters = ", ".join(r or "(no id)" for r in score.per_rater) or "none"
        click.echo(f"{score.complete_queries} of {score.total_queries} queries fully judged "
                   f"({score.judged_items} of {score.total_items} images; raters: {raters})")
        click.echo(f"{'similarity measure':<20}{'success rate':>14}{'paper (Table 1)':>17}")
        for m, rate in score.success.items():
            shown = f"{rate:>13.2f}%" if rate is not None else f"{'-':>14}"
            click.echo(f"{m:<20}{shown}{judge.PAPER_TABLE1[m]:>16.2f}%")
        for pair in score.agreement:
            kappa = f"{pair.kappa:.3f}" if pair.kappa is not None else "-"
            percent = f"{pair.percent:.1f}%" if pair.percent is not None else "-"
            click.echo(f"agreement {pair.raters[0]} / {pair.raters[1]}: {percent} of {pair.items} images, "
                       f"Cohen's kappa {kappa}")
        return
    if out is None:
        raise click.UsageError("give --out DIR (and STORE to prepare a new session)")
    if not (out / judge.KEY_FILE).exists():
        if store is None:
            raise click.UsageError("give STORE to prepare a new session")
        from ..search import Retriever

        judge.prepare_session(Retriever.open(store, device="cpu"), out, queries=queries, seed=seed, k=k)
        click.echo(f"prepared {out}")
    if no_serve:
        return
    click.echo(f"judge at http://{host}:{port}/judge/ (Ctrl-C to stop; every click is saved)", err=True)
    judge.serve(out, host=host, port=port, token=token, extra_hosts=extra_hosts)


# -- the search page ---------------------------------------------------------------------
@_command(main, "serve")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; beyond loopback a token is required.")
@click.option("--port", type=click.IntRange(min=1, max=65535), default=8000, show_default=True)
@click.option("--token", default=None, help="Access token required on every request [default: $DERMRIS_TOKEN].")
@click.option("--device", type=_DEVICES, default="auto", show_default=True)
@click.option("--judge", "judge_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also serve this judgment session (dermris judge --out) at /judge/.")
@click.option("--allowed-host", "extra_hosts", multiple=True,
              help="Another name the server is reached by (e.g. a DNS name; repeatable).")
def serve_cmd(store, host, port, token, device, judge_dir, extra_hosts):
    """Serve a search page and an HTTP API over STORE (OpenAPI docs at /api/docs)."""
    from .server import serve

    click.echo(f"dermris: http://{host}:{port}/ (API docs: /api/docs; Ctrl-C to stop)", err=True)
    serve(store, host=host, port=port, token=token, device=device, judge_session=judge_dir, extra_hosts=extra_hosts)


# -- training ----------------------------------------------------------------------------
@main.group("train")
def train_group() -> None:
    """Train the paper's models (members, ensemble head, segmenter) into a weights file."""


def _training_options(func):
    options = [
        click.option("--preset", type=click.Choice(list_presets()), default="tiny", show_default=True,
                     help="Architecture to start from (ignored with --weights)."),
        click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Start from this dermris weights file (e.g. the previous stage's output)."),
        click.option("--backbone-weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Local timm checkpoint for the backbones."),
        click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True),
        click.option("--lr", type=float, default=1e-3, show_default=True),
        click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
                     show_default=True),
        click.option("--augment", type=click.Choice(["online", "offline", "none"]), default="online", show_default=True,
                     help="On-the-fly augmentation, the paper's 7x offline expansion, or none."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", type=_DEVICES, default="auto", show_default=True),
        click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
                     help="Weights file to write (checkpoints and metrics go beside it)."),
        click.option("--resume", is_flag=True, help="Continue from the last checkpoint of a crashed run."),
        click.option("--part-only", is_flag=True, help="Write only the trained part (applied to a preset on load)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _base_model(preset, weights, backbone_weights):
    from dermris.models import build_model, get_preset, load_model

    if weights is not None:
        return load_model(weights)
    return build_model(get_preset(preset), backbone_weights=backbone_weights)


def _train_config(epochs, batch_size, lr, val_fraction, augment, seed, device, balance="sampler"):
    from dermris.models.training import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, val_fraction=val_fraction, augment=augment,
                       seed=seed, device=device, balance=balance)


def _classification_items(images, metadata, id_column, label_column):
    from dermris.models.errors import DataError
    from dermris.models.training import read_classification_set

    if len(images) != len(metadata) or not images:
        raise DataError("give one --metadata CSV per --images folder")
    items = []
    for folder, csv_path in zip(images, metadata):
        items += read_classification_set(folder, csv_path, id_column=id_column, label_column=label_column)
    return items


def _report_training(out, stage_prefix):
    history = json.loads(Path(str(out) + ".metrics.json").read_text("utf-8"))
    for entry in history:
        if entry["stage"].startswith(stage_prefix):
            metrics = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in entry.items() if k not in ("stage", "epoch"))
            click.echo(f"{entry['stage']} epoch {entry['epoch'] + 1}: {metrics}")
    click.echo(f"weights: {out}")


def _classification_command(name, doc, trainer_name, stage_prefix):
    @_command(train_group, name, help=doc)
    @click.option("--images", "images", multiple=True, required=True,
                  type=click.Path(exists=True, file_okay=False, path_type=Path), help="Image folder (repeatable).")
    @click.option("--metadata", "metadata", multiple=True, required=True,
                  type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Its CSV (repeatable, in order).")
    @click.option("--id-column", help="Image id column (default: image_name, isic_id, image, image_id).")
    @click.option("--label-column", help="Label column (default: target, melanoma, MEL or benign_malignant).")
    @click.option("--balance", type=click.Choice(["sampler", "none"]), default="sampler", show_default=True,
                  help="Draw both classes equally often.")
    @_training_options
    def command(images, metadata, id_column, label_column, balance, preset, weights, backbone_weights, epochs,
                batch_size, lr, val_fraction, augment, seed, device, out, resume, part_only):
        from dermris.models import training

        items = _classification_items(images, metadata, id_column, label_column)
        cfg = _train_config(epochs, batch_size, lr, val_fraction, augment, seed, device, balance)
        trainer = getattr(training, trainer_name)
        trainer(_base_model(preset, weights, backbone_weights), items, out, cfg, resume=resume,
                progress=_progress(), part_only=part_only)
        _report_training(out, stage_prefix)

    return command


_classification_command("classifier", "Stage 1: train each ensemble member with binary focal loss.",
                        "train_classifier", "member")
_classification_command("ensemble", "Stage 2: train the ensemble head (members frozen) with focal loss.",
                        "train_ensemble", "ensemble")


@_command(train_group, "segmenter")
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Image folder (or a PH2 root).")
@click.option("--masks", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Mask folder, matched by file stem (_segmentation / _lesion suffixes); default: --images.")
@_training_options
def train_segmenter_cmd(images, masks, preset, weights, backbone_weights, epochs, batch_size, lr, val_fraction,
                        augment, seed, device, out, resume, part_only):
    """Stage 3: train the segmenter with focal Tversky loss."""
    from dermris.models.training import read_segmentation_set, train_segmenter

    items = read_segmentation_set(images, masks)
    cfg = _train_config(epochs, batch_size, lr, val_fraction, augment, seed, device, "none")
    train_segmenter(_base_model(preset, weights, backbone_weights), items, out, cfg, resume=resume,
                    progress=_progress(), part_only=part_only)
    _report_training(out, "segmenter")


# -- demo --------------------------------------------------------------------------------
@_command(main, "demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("dermris-demo"),
              show_default=True, help="Folder for the generated images, the store and the sheet.")
@click.option("--per-class", type=click.IntRange(min=2), default=8, show_default=True,
              help="Synthetic images per texture class (4 classes).")
@click.option("-k", "k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--preset", type=click.Choice(list_presets()), default=None,
              help="Model preset [default: the best installed: lite0 when its weights are installed, else tiny].")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
def demo_cmd(out, per_class, k, preset, as_json):
    """Generate synthetic lesions, index them, run one query, write a contact sheet."""
    from .demo import run_demo

    result = run_demo(out, per_class=per_class, k=k, preset=preset, progress=_progress() and not as_json)
    if as_json:
        click.echo(json.dumps({
            "store": str(result.store), "preset": result.preset, "model": result.model_description,
            "query": str(result.query), "query_texture": result.query_texture, "sheet": str(result.sheet),
            "results": {m: [h.to_dict() for h in hits] for m, hits in result.results.items()},
        }, indent=1))
        return
    click.echo(f"model: {result.model_description}")
    click.echo(f"indexed {result.rows} synthetic images into {result.store}")
    click.echo(f"query: {result.query} (texture {result.query_texture}, not in the store)")
    _print_results(result.results)
    click.echo(f"\ncontact sheet: {result.sheet}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
