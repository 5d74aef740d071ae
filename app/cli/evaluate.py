"""``dermris evaluate`` (labels) and ``dermris judge`` (blinded manual judgment)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dermris.retriever.measures import MEASURES

from ._common import DEVICES, command, main


@command(main, "evaluate")
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--label-column",
    help="Metadata column with the label (e.g. diagnosis_1, target); with --hierarchy, "
    "default: its first level.",
)
@click.option(
    "--group-column",
    default="auto",
    show_default=True,
    help="Exclude results sharing the query's value here (patient_id, lesion_id); auto: "
    "lesion_id when the store has it (leave one lesion out); none: only the query itself.",
)
@click.option(
    "--by",
    "by",
    multiple=True,
    metavar="COLUMN",
    help="Also report the metrics per value of COLUMN (repeatable), e.g. fitzpatrick_skin_type.",
)
@click.option(
    "--hierarchy",
    is_flag=True,
    help="Also report the metrics per level of the diagnosis hierarchy (diagnosis_1 .. "
    "diagnosis_5, the levels the store has), relevance judged at each level.",
)
@click.option(
    "--confirmed-only",
    is_flag=True,
    help="Only rows with diagnosis_confirm_type set, as queries and as results.",
)
@click.option("-k", "k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option(
    "--queries",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Labelled rows sampled as queries.",
)
@click.option("--all", "all_rows", is_flag=True, help="Use every labelled row as a query.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--measures", "measures", multiple=True, type=click.Choice(MEASURES), help="Default: all nine."
)
@click.option("--bootstrap", type=click.IntRange(min=0), default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Bar chart PNG.")
@click.option("--device", type=DEVICES, default="auto", show_default=True)
def evaluate_cmd(
    store,
    label_column,
    group_column,
    by,
    hierarchy,
    confirmed_only,
    k,
    queries,
    all_rows,
    seed,
    measures,
    bootstrap,
    as_json,
    plot,
    device,
):
    """Leave-one-out evaluation of the measures by labels (Table 1, automatically), overall,
    per stratum (--by) and per level of the diagnosis hierarchy (--hierarchy)."""
    from dermris.app.evaluate import HIERARCHY, evaluate, plot_report, plot_strata
    from dermris.core.errors import EvaluationError
    from dermris.retriever import Retriever

    retriever = Retriever.open(store, device=device)
    levels: tuple[str, ...] = ()
    if hierarchy:
        levels = tuple(c for c in HIERARCHY if c in retriever.metadata_columns)
        if not levels:
            raise EvaluationError(
                f"--hierarchy: the store has none of the columns {', '.join(HIERARCHY)}"
            )
    if label_column is None:
        if not levels:
            raise click.UsageError("give --label-column (or --hierarchy)")
        label_column = levels[0]
    report = evaluate(
        retriever,
        label_column,
        group_column=None if group_column == "none" else group_column,
        k=k,
        queries=None if all_rows else queries,
        seed=seed,
        measures=measures or MEASURES,
        bootstrap=bootstrap,
        by=by,
        hierarchy=levels,
        confirmed_only=confirmed_only,
    )
    strata_plot = None
    if plot is not None:
        plot_report(report, plot)
        if report.strata or report.levels:
            strata_plot = plot.with_name(f"{plot.stem}-strata{plot.suffix or '.png'}")
            plot_strata(report, strata_plot)
    if as_json:
        payload = report.to_dict()
        if strata_plot is not None:
            payload["strata_plot"] = str(strata_plot)
        click.echo(json.dumps(payload, indent=1))
        return
    pct = int(report.confidence * 100)
    group_column = report.group_column
    click.echo(
        f"{len(report.queries)} queries, k={k}, label {label_column!r}"
        + (f", same {group_column!r} excluded" if group_column else "")
        + (", confirmed diagnoses only" if confirmed_only else "")
        + f"; [{pct} % bootstrap CI]"
    )
    click.echo(
        f"{'measure':<10} {'precision@' + str(k):>24} {'mAP@' + str(k):>24} "
        f"{'MV acc@' + str(k):>24}"
    )
    for m, metrics in report.metrics.items():
        cells = "".join(
            f"{s.mean:>8.3f} [{s.low:.3f}, {s.high:.3f}]"
            for s in (metrics["precision"], metrics["map"], metrics["majority_vote"])
        )
        click.echo(f"{m:<10} {cells}")
    sections = [
        (f"{s.column} = {s.value if s.value is not None else '(missing)'}", s)
        for s in report.strata
    ] + [(f"level {lv.column}", lv) for lv in report.levels]
    for title, stratum in sections:
        click.echo(f"\n{title} ({stratum.queries} queries)")
        for m, metrics in stratum.metrics.items():
            cells = "".join(
                f"{s.mean:>8.3f} [{s.low:.3f}, {s.high:.3f}]"
                for s in (metrics["precision"], metrics["map"], metrics["majority_vote"])
            )
            click.echo(f"{m:<10} {cells}")
    if plot is not None:
        click.echo(f"plot: {plot}")
    if strata_plot is not None:
        click.echo(f"strata plot: {strata_plot}")


@command(main, "judge")
@click.argument("store", required=False, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Session folder.")
@click.option("--queries", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-k", "k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the page binds to.")
@click.option("--port", type=click.IntRange(min=1, max=65535), default=8765, show_default=True)
@click.option(
    "--token",
    default=None,
    help="Access token required on every request [default: $DERMRIS_TOKEN].",
)
@click.option(
    "--allowed-host",
    "extra_hosts",
    multiple=True,
    help="Another name the page is reached by (e.g. a DNS name; repeatable).",
)
@click.option("--no-serve", is_flag=True, help="Only prepare the session.")
@click.option(
    "--score",
    "score_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Score the judgments in this session folder instead.",
)
@click.option("--rater", default=None, help="With --score: only this rater's judgments.")
@click.option(
    "--reader-study",
    is_flag=True,
    help="A crossover reader study instead: each case diagnosed with and without the retrieved "
    "images (order randomised per rater); needs --label-column to prepare.",
)
@click.option("--label-column", help="With --reader-study: the diagnosis column (the answers).")
@click.option(
    "--measure",
    type=click.Choice(MEASURES),
    default="style",
    show_default=True,
    help="With --reader-study: the measure that retrieves the images shown.",
)
@click.option("--json", "as_json", is_flag=True)
def judge_cmd(
    store,
    out,
    queries,
    seed,
    k,
    host,
    port,
    token,
    extra_hosts,
    no_serve,
    score_dir,
    rater,
    reader_study,
    label_column,
    measure,
    as_json,
):
    """Blinded manual judgment (paper 4.1): prepare and serve a session, or --score it.

    With --reader-study: a crossover reader study (diagnosis, confidence and time per case, with
    and without retrieval); --score then reports accuracy with vs without per rater (McNemar).
    """
    from dermris.app import judge
    from dermris.app import reader_study as study

    if score_dir is not None and (score_dir / study.READER_STUDY_FILE).exists():
        _print_reader_score(study.score_reader_study(score_dir, rater=rater), as_json)
        return
    if reader_study:
        if out is None:
            raise click.UsageError("give --out DIR (and STORE to prepare a new reader study)")
        if not (out / study.READER_KEY_FILE).exists():
            if store is None or label_column is None:
                raise click.UsageError("give STORE and --label-column to prepare a reader study")
            from dermris.retriever import Retriever

            study.prepare_reader_study(
                Retriever.open(store, device="cpu"),
                out,
                label_column=label_column,
                cases=queries,
                k=k,
                measure=measure,
                seed=seed,
            )
            click.echo(f"prepared {out}")
        if no_serve:
            return
        click.echo(f"reader study at http://{host}:{port}/reader/ (Ctrl-C to stop)", err=True)
        study.serve_reader(out, host=host, port=port, token=token, extra_hosts=extra_hosts)
        return
    if score_dir is not None:
        score = judge.score_session(score_dir, rater=rater)
        if as_json:
            click.echo(json.dumps(score.to_dict(), indent=1))
            return
        raters = ", ".join(r or "(no id)" for r in score.per_rater) or "none"
        click.echo(
            f"{score.complete_queries} of {score.total_queries} queries fully judged "
            f"({score.judged_items} of {score.total_items} images; raters: {raters})"
        )
        click.echo(f"{'similarity measure':<20}{'success rate':>14}{'paper (Table 1)':>17}")
        for m, rate in score.success.items():
            shown = f"{rate:>13.2f}%" if rate is not None else f"{'-':>14}"
            click.echo(f"{m:<20}{shown}{judge.PAPER_TABLE1[m]:>16.2f}%")
        for pair in score.agreement:
            kappa = f"{pair.kappa:.3f}" if pair.kappa is not None else "-"
            percent = f"{pair.percent:.1f}%" if pair.percent is not None else "-"
            click.echo(
                f"agreement {pair.raters[0]} / {pair.raters[1]}: {percent} of {pair.items} images, "
                f"Cohen's kappa {kappa}"
            )
        return
    if out is None:
        raise click.UsageError("give --out DIR (and STORE to prepare a new session)")
    if not (out / judge.KEY_FILE).exists():
        if store is None:
            raise click.UsageError("give STORE to prepare a new session")
        from dermris.retriever import Retriever

        judge.prepare_session(
            Retriever.open(store, device="cpu"), out, queries=queries, seed=seed, k=k
        )
        click.echo(f"prepared {out}")
    if no_serve:
        return
    click.echo(
        f"judge at http://{host}:{port}/judge/ (Ctrl-C to stop; every click is saved)", err=True
    )
    judge.serve(out, host=host, port=port, token=token, extra_hosts=extra_hosts)


def _print_reader_score(score, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(score.to_dict(), indent=1))
        return

    def pct(value):
        return f"{100 * value:6.1f}%" if value is not None else f"{'-':>7}"

    click.echo(f"reader study: {score.cases} cases, accuracy with vs without retrieval")
    click.echo(
        f"{'rater':<16}{'paired':>7}{'with':>9}{'without':>9}{'only w':>8}{'only w/o':>9}"
        f"{'McNemar p':>11}{'s with':>8}{'s w/o':>8}"
    )
    rows = list(score.per_rater.items()) + ([("(pooled)", score.pooled)] if score.pooled else [])
    for name, o in rows:
        seconds = "".join(
            f"{v:8.1f}" if v is not None else f"{'-':>8}"
            for v in (o.seconds_with, o.seconds_without)
        )
        click.echo(
            f"{name[:15]:<16}{o.paired:>7}{pct(o.accuracy_with):>9}{pct(o.accuracy_without):>9}"
            f"{o.only_with:>8}{o.only_without:>9}{o.p_value:>11.4f}{seconds}"
        )
