"""What an indexing run did: :class:`IndexReport`, filled by the pipeline stages that run it."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["IndexReport"]


@dataclass
class IndexReport:
    """What an indexing run did.

    Attributes
    ----------
    indexed : int
        Rows added by this run.
    already_indexed : int
        Files whose bytes were already in the store (skipped).
    duplicates : list of (str, str)
        ``(path, path_of_first_copy)`` for files with the same bytes as another file.
    rejected : list of (str, str)
        ``(path, reason)`` for files that could not be indexed.
    previously_deleted : list of str
        Files whose bytes were deleted from the store before (``dermris delete``): not re-added.
    without_metadata : list of str
        Image ids indexed without a row in the metadata CSV (their metadata columns are null).
    rows : int
        Committed rows in the store after the run.
    seconds : float
        Wall time.
    stages : dict of str to float
        Seconds per stage: ``read_wait`` (the model waiting for decoded batches), ``model``
        (forward passes and copies back), ``write`` (the writer thread, overlapped with the
        model), ``derived`` (FAISS and style sketch at the end), ``setup`` (model and store).
    device, precision : str
        Where and at what precision the model ran (on a cluster: every worker's, comma-separated).
    cluster : dict
        On a Dask cluster: its address and dashboard, the workers that ran blocks, and the number
        of blocks (empty for a run in one process).
    segmenter_trained : bool
        Whether the store's masks come from a trained segmenter (else the Dice part of the
        Dice-based measures is noise).
    """

    indexed: int = 0
    already_indexed: int = 0
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    previously_deleted: list[str] = field(default_factory=list)
    without_metadata: list[str] = field(default_factory=list)
    rows: int = 0
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    device: str = ""
    precision: str = ""
    cluster: dict = field(default_factory=dict)
    segmenter_trained: bool = False

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        return {
            "indexed": self.indexed,
            "already_indexed": self.already_indexed,
            "duplicates": [{"path": p, "same_as": q} for p, q in self.duplicates],
            "rejected": [{"path": p, "reason": r} for p, r in self.rejected],
            "previously_deleted": list(self.previously_deleted),
            "without_metadata": list(self.without_metadata),
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
            "stages": {k: round(v, 3) for k, v in self.stages.items()},
            "device": self.device,
            "precision": self.precision,
            "segmenter_trained": self.segmenter_trained,
            **({"cluster": dict(self.cluster)} if self.cluster else {}),
        }
