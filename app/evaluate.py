"""Label-based evaluation of the nine measures (the automatic counterpart of the paper's Table 1).

Leave-one-out: each query is a stored row; its own row and every row of its group (same
patient or lesion) are excluded from its results, so near-duplicates of the query cannot
inflate the scores. Per measure: precision@k, mAP@k and majority-vote accuracy@k, each with a
bootstrap confidence interval over queries. Only the Retriever's public API is used.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dermris.core.errors import EvaluationError
from dermris.retriever import Retriever
from dermris.retriever.measures import MEASURES, check_measures

__all__ = [
    "EvaluationError",
    "MetricSummary",
    "EvaluationReport",
    "query_metrics",
    "evaluate",
    "plot_report",
]


@dataclass(frozen=True)
class MetricSummary:
    """Mean of a per-query metric and its bootstrap confidence interval."""

    mean: float
    low: float
    high: float

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high}


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
    """

    k: int
    label_column: str
    group_column: str | None
    queries: list[int]
    confidence: float
    metrics: dict[str, dict[str, MetricSummary]] = field(default_factory=dict)
    per_query: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "k": self.k,
            "label_column": self.label_column,
            "group_column": self.group_column,
            "queries": len(self.queries),
            "query_rows": list(self.queries),
            "confidence": self.confidence,
            "metrics": {
                m: {name: s.to_dict() for name, s in v.items()} for m, v in self.metrics.items()
            },
        }


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
    group_column: str | None = None,
    k: int = 5,
    queries: int | None = 50,
    seed: int = 0,
    measures: Sequence[str] = MEASURES,
    bootstrap: int = 1000,
    confidence: float = 0.95,
) -> EvaluationReport:
    """Leave-one-out evaluation with stored rows as queries.

    Parameters
    ----------
    retriever : Retriever
        An opened retriever.
    label_column : str
        Metadata column holding the label (e.g. ``diagnosis_1``, ``benign_malignant``, ``target``).
    group_column : str, optional
        Rows sharing the query's value here (``patient_id``, ``lesion_id``) are excluded.
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
    """
    measures = check_measures(measures)
    if k < 1:
        raise EvaluationError("k must be >= 1")
    meta = retriever.metadata()
    for column in (label_column, group_column):
        if column is not None and column not in meta.column_names:
            raise EvaluationError(
                f"no metadata column {column!r}; the store has: {', '.join(meta.column_names)}"
            )
    labels = meta.column(label_column).to_pylist()
    groups = meta.column(group_column).to_pylist() if group_column else [None] * len(labels)
    live = retriever.live
    labelled = [r for r, lab in enumerate(labels) if lab is not None and live[r]]
    if len(labelled) < 2:
        raise EvaluationError(f"fewer than two rows have a value in {label_column!r}")
    rng = np.random.default_rng(seed)
    if queries is None or queries >= len(labelled):
        query_rows = labelled
    else:
        query_rows = sorted(rng.choice(labelled, size=queries, replace=False).tolist())

    members: dict = {}
    for r, g in enumerate(groups):
        if g is not None and live[r]:
            members.setdefault(g, []).append(r)
    label_counts = Counter(labels[r] for r in range(len(labels)) if live[r])

    per_query: dict[str, dict[str, list[float]]] = {
        m: {"precision": [], "map": [], "majority_vote": []} for m in measures
    }
    for q in query_rows:
        excluded = {q}
        if groups[q] is not None:
            excluded.update(members.get(groups[q], []))
        relevant = label_counts[labels[q]] - sum(1 for r in excluded if labels[r] == labels[q])
        results = retriever.search(q, measures=measures, k=k, exclude=sorted(excluded))
        for m in measures:
            kept = [h.row for h in results[m]]
            p, ap, mv = query_metrics(labels[q], [labels[r] for r in kept], relevant, k)
            per_query[m]["precision"].append(p)
            per_query[m]["map"].append(ap)
            per_query[m]["majority_vote"].append(mv)

    report = EvaluationReport(
        k=k,
        label_column=label_column,
        group_column=group_column,
        queries=list(query_rows),
        confidence=confidence,
        per_query=per_query,
    )
    boot_rng = np.random.default_rng(seed + 1)
    for m in measures:
        report.metrics[m] = {
            name: _bootstrap(
                np.asarray(values, np.float64),
                rounds=bootstrap,
                confidence=confidence,
                rng=boot_rng,
            )
            for name, values in per_query[m].items()
        }
    return report


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
