"""Label-based evaluation of the nine measures (the automatic counterpart of the paper's Table 1).

Leave-one-out: each query is a stored row; its own row and every row of its group (same
patient or lesion; ``lesion_id`` by default when the store has it) are excluded from its
results, so near-duplicates of the query cannot inflate the scores. Per measure: precision@k,
mAP@k and majority-vote accuracy@k, each with a bootstrap confidence interval over queries.

Stratified: the same per-query results summarised per value of any metadata
column of the query (``by=("fitzpatrick_skin_type", "anatom_site_general")``) and per level of a
hierarchical label (``hierarchy=("diagnosis_1", ..., "diagnosis_5")``: relevance judged at each
level), each stratum with its own bootstrap interval; ``confirmed_only`` keeps to rows whose
``diagnosis_confirm_type`` is set (as queries and as results). Only the Retriever's public API
is used.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc

from dermris.core.errors import EvaluationError
from dermris.retriever import Retriever
from dermris.retriever.measures import MEASURES, check_measures

__all__ = [
    "AUTO",
    "CONFIRM_COLUMN",
    "HIERARCHY",
    "EvaluationError",
    "MetricSummary",
    "StratumSummary",
    "EvaluationReport",
    "query_metrics",
    "evaluate",
    "plot_report",
    "plot_strata",
]


AUTO = "auto"
"""``group_column=AUTO``: leave one lesion out (``lesion_id``) when the store has that column."""

HIERARCHY = ("diagnosis_1", "diagnosis_2", "diagnosis_3", "diagnosis_4", "diagnosis_5")
"""The levels of the ISIC diagnosis hierarchy (isic-cli metadata), coarse to fine."""

CONFIRM_COLUMN = "diagnosis_confirm_type"
"""The ISIC column saying how a diagnosis was confirmed (null: not confirmed)."""

METRICS = ("precision", "map", "majority_vote")


@dataclass(frozen=True)
class MetricSummary:
    """Mean of a per-query metric and its bootstrap confidence interval."""

    mean: float
    low: float
    high: float

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high}


@dataclass(frozen=True)
class StratumSummary:
    """The metrics of the queries of one stratum (a column's value, or a hierarchy level).

    Attributes
    ----------
    column : str
        The column stratified by (or the hierarchy level's label column).
    value : object
        The queries' value in ``column`` (None: missing); None for a hierarchy level.
    queries : int
        Queries in the stratum.
    metrics : dict
        ``{measure: {"precision": MetricSummary, "map": ..., "majority_vote": ...}}``.
    """

    column: str
    value: object
    queries: int
    metrics: dict[str, dict[str, MetricSummary]]

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "value": self.value,
            "queries": self.queries,
            "metrics": {
                m: {name: s.to_dict() for name, s in v.items()} for m, v in self.metrics.items()
            },
        }


@dataclass
class EvaluationReport:
    """Per-measure metrics, in the order of the paper's Table 1.

    Attributes
    ----------
    k : int
        Results per query.
    queries : list of int
        The query rows.
    metrics : dict
        ``{measure: {"precision": MetricSummary, "map": ..., "majority_vote": ...}}``.
    per_query : dict
        ``{measure: {"precision": [...], "map": [...], "majority_vote": [...]}}`` in query order.
    strata : list of StratumSummary
        Per value of every ``by`` column (columns in the order given, values sorted, missing
        last).
    levels : list of StratumSummary
        Per level of the ``hierarchy`` (coarse to fine), relevance judged at that level.
    confirmed_only : bool
        Only rows with a confirmed diagnosis were queries and results.
    """

    k: int
    label_column: str
    group_column: str | None
    queries: list[int]
    confidence: float
    metrics: dict[str, dict[str, MetricSummary]] = field(default_factory=dict)
    per_query: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    strata: list[StratumSummary] = field(default_factory=list)
    levels: list[StratumSummary] = field(default_factory=list)
    confirmed_only: bool = False

    def to_dict(self) -> dict:
        """JSON-ready form (``strata``: ``{column: [stratum, ...]}``; ``hierarchy``: one entry
        per level, with its ``level``)."""
        out = {
            "k": self.k,
            "label_column": self.label_column,
            "group_column": self.group_column,
            "confirmed_only": self.confirmed_only,
            "queries": len(self.queries),
            "query_rows": list(self.queries),
            "confidence": self.confidence,
            "metrics": {
                m: {name: s.to_dict() for name, s in v.items()} for m, v in self.metrics.items()
            },
        }
        if self.strata:
            strata: dict[str, list] = {}
            for stratum in self.strata:
                strata.setdefault(stratum.column, []).append(stratum.to_dict())
            out["strata"] = strata
        if self.levels:
            out["hierarchy"] = [
                {"level": lv.column, **{k: v for k, v in lv.to_dict().items() if k != "value"}}
                for lv in self.levels
            ]
        return out


def query_metrics(
    query_label, result_labels: Sequence, relevant_available: int, k: int
) -> tuple[float, float, float]:
    """precision@k, AP@k and majority-vote correctness of one query.

    Parameters
    ----------
    query_label
        The query's label.
    result_labels : sequence
        Labels of the ranked results (at most ``k`` are used).
    relevant_available : int
        Rows with the query's label that could have been returned (not excluded).
    k : int
        Cut-off.

    Notes
    -----
    ``AP@k = sum_i P@i * rel_i / min(k, R)`` with ``R`` the relevant rows available (0 when
    ``R = 0``). The majority vote takes the most frequent label among the results; a tie goes
    to the label that appears first in the ranking.
    """
    labels = list(result_labels)[:k]
    rel = [lab == query_label for lab in labels]
    precision = sum(rel) / k
    hits, ap = 0, 0.0
    for i, r in enumerate(rel, start=1):
        if r:
            hits += 1
            ap += hits / i
    denom = min(k, relevant_available)
    ap = ap / denom if denom > 0 else 0.0
    if labels:
        counts = Counter(labels)
        best = max(counts.values())
        vote = next(lab for lab in labels if counts[lab] == best)
        majority = float(vote == query_label)
    else:
        majority = 0.0
    return precision, ap, majority


def _bootstrap(
    values: np.ndarray, *, rounds: int, confidence: float, rng: np.random.Generator
) -> MetricSummary:
    mean = float(values.mean()) if len(values) else float("nan")
    if len(values) < 2 or rounds < 1:
        return MetricSummary(mean, mean, mean)
    idx = rng.integers(0, len(values), size=(rounds, len(values)))
    means = values[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    return MetricSummary(
        mean, float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))
    )


def evaluate(
    retriever: Retriever,
    label_column: str,
    *,
    group_column: str | None = AUTO,
    k: int = 5,
    queries: int | None = 50,
    seed: int = 0,
    measures: Sequence[str] = MEASURES,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    by: Sequence[str] = (),
    hierarchy: Sequence[str] = (),
    confirmed_only: bool = False,
    confirm_column: str = CONFIRM_COLUMN,
) -> EvaluationReport:
    """Leave-one-out evaluation with stored rows as queries, overall and per stratum.

    Parameters
    ----------
    retriever : Retriever
        An opened retriever.
    label_column : str
        Metadata column holding the label (e.g. ``diagnosis_1``, ``benign_malignant``, ``target``).
    group_column : str or None
        Rows sharing the query's value here (``patient_id``, ``lesion_id``) are excluded.
        :data:`AUTO` (default): ``lesion_id`` when the store has it, else nothing; None or
        ``"none"``: only the query's own row.
    k : int
        Results per query.
    queries : int or None
        Number of labelled rows sampled as queries (seeded); ``None`` uses every labelled row.
    seed : int
        Seed of the query sample and the bootstrap.
    measures : sequence of str
        Measures to evaluate (default: all nine, in Table 1 order).
    bootstrap : int
        Bootstrap resamples for the confidence intervals.
    confidence : float
        Confidence level of the intervals.
    by : sequence of str
        Metadata columns to stratify the queries by (each value its own summary).
    hierarchy : sequence of str
        Label columns of a hierarchy, coarse to fine (e.g. :data:`HIERARCHY`): per level, the
        queries with a label there, a result relevant when its label at that level matches.
    confirmed_only : bool
        Only rows whose ``confirm_column`` is set are queries and may be results.
    confirm_column : str
        The column of ``confirmed_only``.
    """
    measures = check_measures(measures)
    if k < 1:
        raise EvaluationError("k must be >= 1")
    meta = retriever.metadata()
    if group_column == AUTO:
        group_column = "lesion_id" if "lesion_id" in meta.column_names else None
    elif group_column == "none":
        group_column = None
    by, hierarchy = tuple(by), tuple(hierarchy)
    needed = [label_column, group_column, *by, *hierarchy]
    if confirmed_only:
        needed.append(confirm_column)
    for column in needed:
        if column is not None and column not in meta.column_names:
            raise EvaluationError(
                f"no metadata column {column!r}; the store has: {', '.join(meta.column_names)}"
            )
    labels = meta.column(label_column).to_pylist()
    groups = meta.column(group_column).to_pylist() if group_column else [None] * len(labels)
    live = retriever.live
    if confirmed_only:
        live = live & np.asarray(meta.column(confirm_column).is_valid(), bool)
    labelled = [r for r, lab in enumerate(labels) if lab is not None and live[r]]
    if len(labelled) < 2:
        raise EvaluationError(
            f"fewer than two rows have a value in {label_column!r}"
            + (f" and a confirmed diagnosis ({confirm_column})" if confirmed_only else "")
        )
    rng = np.random.default_rng(seed)
    if queries is None or queries >= len(labelled):
        query_rows = labelled
    else:
        query_rows = sorted(rng.choice(labelled, size=queries, replace=False).tolist())
    where = pc.field(confirm_column).is_valid() if confirmed_only else None

    members: dict = {}
    for r, g in enumerate(groups):
        if g is not None and live[r]:
            members.setdefault(g, []).append(r)

    hits: dict[str, list[list[int]]] = {m: [] for m in measures}
    excluded_of: list[set[int]] = []
    for q in query_rows:
        excluded = {q}
        if groups[q] is not None:
            excluded.update(members.get(groups[q], []))
        excluded_of.append(excluded)
        results = retriever.search(q, measures=measures, k=k, exclude=sorted(excluded), where=where)
        for m in measures:
            hits[m].append([h.row for h in results[m]])

    per_query = _metrics_per_query(labels, live, query_rows, excluded_of, hits, k)
    report = EvaluationReport(
        k=k,
        label_column=label_column,
        group_column=group_column,
        queries=list(query_rows),
        confidence=confidence,
        per_query=per_query,
        confirmed_only=confirmed_only,
    )
    boot_rng = np.random.default_rng(seed + 1)
    everyone = np.arange(len(query_rows))
    report.metrics = _summaries(per_query, everyone, bootstrap, confidence, boot_rng)
    strata_rng = np.random.default_rng(seed + 2)
    for column in by:
        values = meta.column(column).to_pylist()
        of_query = [values[q] for q in query_rows]
        present = sorted({v for v in of_query if v is not None}, key=lambda v: (str(v), v))
        for value in [*present, None] if None in of_query else present:
            picked = np.asarray([i for i, v in enumerate(of_query) if v == value], np.intp)
            report.strata.append(
                StratumSummary(
                    column,
                    value,
                    len(picked),
                    _summaries(per_query, picked, bootstrap, confidence, strata_rng),
                )
            )
    for level in hierarchy:
        level_labels = meta.column(level).to_pylist()
        picked = np.asarray(
            [i for i, q in enumerate(query_rows) if level_labels[q] is not None], np.intp
        )
        level_metrics = _metrics_per_query(level_labels, live, query_rows, excluded_of, hits, k)
        report.levels.append(
            StratumSummary(
                level,
                None,
                len(picked),
                _summaries(level_metrics, picked, bootstrap, confidence, strata_rng),
            )
        )
    return report


def _metrics_per_query(
    labels: list,
    live: np.ndarray,
    query_rows: list[int],
    excluded_of: list[set[int]],
    hits: dict[str, list[list[int]]],
    k: int,
) -> dict[str, dict[str, list[float]]]:
    """precision@k, AP@k and majority vote of every query under ``labels`` (NaN for a query
    without a label: not counted in any summary)."""
    counts = Counter(labels[r] for r in range(len(labels)) if live[r] and labels[r] is not None)
    out: dict[str, dict[str, list[float]]] = {m: {n: [] for n in METRICS} for m in hits}
    for i, q in enumerate(query_rows):
        label = labels[q]
        relevant = (
            counts[label] - sum(1 for r in excluded_of[i] if labels[r] == label and live[r])
            if label is not None
            else 0
        )
        for m, rows in hits.items():
            if label is None:
                values: tuple[float, ...] = (float("nan"),) * 3
            else:
                values = query_metrics(label, [labels[r] for r in rows[i]], relevant, k)
            for name, value in zip(METRICS, values):
                out[m][name].append(value)
    return out


def _summaries(
    per_query: dict[str, dict[str, list[float]]],
    picked: np.ndarray,
    rounds: int,
    confidence: float,
    rng: np.random.Generator,
) -> dict[str, dict[str, MetricSummary]]:
    return {
        m: {
            name: _bootstrap(
                np.asarray(values, np.float64)[picked],
                rounds=rounds,
                confidence=confidence,
                rng=rng,
            )
            for name, values in metrics.items()
        }
        for m, metrics in per_query.items()
    }


def plot_report(report: EvaluationReport, out) -> None:
    """Bar chart of the three metrics per measure, with the confidence intervals."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvaluationError("--plot needs matplotlib: pip install 'dermris[eval]'") from None
    measures = list(report.metrics)
    names = [
        ("precision", f"precision@{report.k}"),
        ("map", f"mAP@{report.k}"),
        ("majority_vote", f"MV acc@{report.k}"),
    ]
    x = np.arange(len(measures))
    width = 0.27
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for i, (key, label) in enumerate(names):
        means = np.array([report.metrics[m][key].mean for m in measures])
        lows = np.array([report.metrics[m][key].low for m in measures])
        highs = np.array([report.metrics[m][key].high for m in measures])
        ax.bar(
            x + (i - 1) * width,
            means,
            width,
            yerr=[means - lows, highs - means],
            capsize=3,
            label=label,
        )
    ax.set_xticks(x, measures, rotation=30)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(
        f"dermris evaluate: {len(report.queries)} queries, label {report.label_column}"
        + (f", excluding same {report.group_column}" if report.group_column else "")
        + f" ({int(report.confidence * 100)} % bootstrap CI)"
    )
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_strata(report: EvaluationReport, out) -> None:
    """One panel per stratification (each ``by`` column, then the hierarchy): precision@k and
    majority-vote accuracy@k per stratum, one bar per measure, with the bootstrap intervals."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvaluationError("--plot needs matplotlib: pip install 'dermris[eval]'") from None
    panels: list[tuple[str, list[tuple[str, StratumSummary]]]] = []
    for column in dict.fromkeys(s.column for s in report.strata):
        panels.append(
            (
                column,
                [
                    (f"{s.value if s.value is not None else '(missing)'}\nn={s.queries}", s)
                    for s in report.strata
                    if s.column == column
                ],
            )
        )
    if report.levels:
        panels.append(("hierarchy", [(f"{lv.column}\nn={lv.queries}", lv) for lv in report.levels]))
    if not panels:
        raise EvaluationError("no strata to plot: give by= columns or a hierarchy")
    measures = list(report.metrics)
    metrics = (("precision", f"precision@{report.k}"), ("majority_vote", f"MV acc@{report.k}"))
    width = 0.8 / len(measures)
    fig, axes = plt.subplots(
        len(panels),
        2,
        figsize=(14, 3.6 * len(panels)),
        squeeze=False,
    )
    for row, (title, strata) in enumerate(panels):
        x = np.arange(len(strata))
        for col, (key, label) in enumerate(metrics):
            ax = axes[row][col]
            for j, m in enumerate(measures):
                means = np.array([s.metrics[m][key].mean for _, s in strata])
                lows = np.array([s.metrics[m][key].low for _, s in strata])
                highs = np.array([s.metrics[m][key].high for _, s in strata])
                ax.bar(
                    x - 0.4 + (j + 0.5) * width,
                    means,
                    width,
                    yerr=[means - lows, highs - means],
                    capsize=2,
                    label=m,
                )
            ax.set_xticks(x, [name for name, _ in strata], fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_title(f"{label} by {title}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    axes[0][1].legend(fontsize=7, ncol=3)
    fig.suptitle(
        f"dermris evaluate: label {report.label_column}, k={report.k}"
        + (f", leave one {report.group_column} out" if report.group_column else "")
        + (", confirmed diagnoses only" if report.confirmed_only else "")
        + f" ({int(report.confidence * 100)} % bootstrap CI)"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
