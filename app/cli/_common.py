"""What every ``dermris`` command shares: the click group, logging to stderr, one-line errors,
and the printed form of search results."""

from __future__ import annotations

import functools
import logging
import sys

import click

from dermris.core.errors import DermrisError
from dermris.retriever.measures import COMPONENTS

__all__ = [
    "DEVICES",
    "command",
    "configure_logging",
    "log",
    "main",
    "print_results",
    "print_stats",
    "progress",
]

log = logging.getLogger("dermris")

DEVICES = click.Choice(["auto", "cpu", "cuda"])


class _Settings:
    quiet = False


def configure_logging(verbose: int, quiet: bool) -> None:
    """Diagnostics to stderr: WARNING by default, INFO with -v, DEBUG with -vv, ERROR with -q."""
    level = (
        logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    )
    logger = logging.getLogger("dermris")
    logger.setLevel(level)
    if not any(getattr(h, "_dermris", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        handler._dermris = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    for ours in logger.handlers:
        if getattr(ours, "_dermris", False) and isinstance(ours, logging.StreamHandler):
            ours.setStream(sys.stderr)  # click's test runner swaps sys.stderr per invocation
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.setLevel(level)
    if not warnings_logger.handlers:
        warnings_logger.addHandler(logger.handlers[-1])
    _Settings.quiet = quiet


def progress() -> bool:
    """Whether progress bars are shown (not with --quiet)."""
    return not _Settings.quiet


def command(group: click.Group, name: str, **kwargs):
    """Register a command with the options every command has (-v/--verbose, -q/--quiet), and
    turn dermris errors into one-line messages."""

    def decorate(func):
        @group.command(name, **kwargs)
        @click.option(
            "-v", "--verbose", count=True, help="More diagnostics on stderr (-vv: debug)."
        )
        @click.option(
            "-q", "--quiet", is_flag=True, help="No progress bars; only errors on stderr."
        )
        @functools.wraps(func)
        def wrapper(*args, verbose: int, quiet: bool, **kw):
            configure_logging(verbose, quiet)
            try:
                return func(*args, **kw)
            except DermrisError as exc:
                raise click.ClickException(
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                ) from None
            except OSError as exc:  # the environment (disk full, permissions), not a bug
                where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
                raise click.ClickException(f"{exc.strerror or exc}{where}") from None

        return wrapper

    return decorate


def print_results(results, *, file=None) -> None:
    """One table per measure (rank, row, image id, score, components, metadata columns); under
    each hit the style stages that make up most of its loss when ``results`` is explained."""
    explanation = getattr(results, "explanation", None)
    comp_header = "".join(f"{c:>8}" for c in COMPONENTS)
    columns = []
    for hits in results.values():
        for hit in hits:
            columns = list(hit.metadata)
            break
    for measure, hits in results.items():
        click.echo(f"\n{measure}", file=file)
        meta_header = "".join(f"  {c[:16]:<16}" for c in columns)
        click.echo(
            f"  {'#':>2} {'row':>6}  {'image_id':<28}{'score':>9}{comp_header}{meta_header}",
            file=file,
        )
        for i, hit in enumerate(hits, start=1):
            comps = "".join(
                f"{hit.components[c]:8.4f}" if c in hit.components else f"{'-':>8}"
                for c in COMPONENTS
            )
            meta = "".join(f"  {str(hit.metadata.get(c))[:16]:<16}" for c in columns)
            click.echo(
                f"  {i:>2} {hit.row:>6}  {hit.image_id[:27]:<28}{hit.score:9.4f}{comps}{meta}",
                file=file,
            )
            if getattr(results, "group_by", None) is not None:
                more = ", ".join(str(m) for m in hit.members[:8])
                more += ", ..." if len(hit.members) > 8 else ""
                click.echo(
                    f"{'':>12}{results.group_by} {hit.group}: "
                    f"{len(hit.members)} more row(s){' (' + more + ')' if more else ''}",
                    file=file,
                )
            if explanation is not None:
                from dermris.retriever.explain import stage_summary

                shares = " · ".join(
                    f"stage {s.stage + 1} {100 * s.share:.0f}%"
                    for s in stage_summary(explanation, hit)
                )
                click.echo(f"{'':>12}style loss from: {shares or '- (the same style)'}", file=file)


def print_stats(stats) -> None:
    """What a search cost, on stdout."""
    click.echo(
        f"\nstats: {stats.rows} rows; style rows read {stats.style_rows_read}, "
        f"mask rows read {stats.mask_rows_read}, {stats.bytes_read / 1e6:.2f} MB read"
    )
    click.echo(
        "  rows re-ranked exactly: " + ", ".join(f"{m} {n}" for m, n in stats.reranked.items())
    )
    click.echo(
        f"  seconds: {stats.seconds:.4f} ("
        + ", ".join(f"{s} {t:.4f}" for s, t in stats.stage_seconds.items())
        + ")"
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dermris")
def main() -> None:
    """dermris: content-based image retrieval for dermoscopy (style, Dice and I1 scores)."""
