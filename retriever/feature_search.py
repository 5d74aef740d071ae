"""The feature measures through FAISS: nearest rows by ES and CS, and ED_max, exactly.

FAISS answers in float32 (``||x||^2 + ||q||^2 - 2 q.x`` with BLAS, or direct differences), so
its order can differ from the exact float64 order by rounding. Each answer is therefore
*certified*: FAISS returns more candidates than asked, their distances are recomputed exactly
(float64, as the rest of dermris does), and the answer stands only if every row FAISS did not
return is provably worse, i.e. its float32 distance minus the worst-case rounding error
(``4 (F + 1) 2^-24`` times the magnitudes involved) is still beyond the exact k-th. Otherwise
the candidate count doubles, and past a point the exact full pass answers. ED_max uses the
inner-product trick on one augmented flat index of ``[x, ||x||^2]``: the nearest rows maximise
``<., [2q, -1]> = ||q||^2 - ||q - x||^2`` and the farthest ``<., [-2q, 1]>``. A second flat
index of unit vectors answers cosine.

With faiss-gpu installed and a CUDA device, the flat indexes live on the GPU.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FeatureSearch"]

_U = 2.0**-24  # float32 unit round-off
_MAX_ROUNDS = 6


def _selector(faiss, allowed: np.ndarray | None):
    if allowed is None or allowed.all():
        return None, None
    bits = np.packbits(allowed.astype(np.uint8), bitorder="little")
    return faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits)), bits


class FeatureSearch:
    """Exact top-k by Euclidean and cosine score, and ``ED_max``, through FAISS flat indexes.

    Parameters
    ----------
    features : np.ndarray
        ``(N, F)`` float32, the store's features (rows = FAISS ids).
    use_gpu : bool
        Put the indexes on the GPU when faiss-gpu is installed.
    exact : callable, optional
        ``exact(feature, rows) -> (distances, cosines)`` in float64: the caller's own exact
        arithmetic, so that certified answers carry bit-identical values (default: NumPy).
    """

    def __init__(self, features: np.ndarray, *, use_gpu: bool = False, exact=None) -> None:
        import faiss

        self._exact = exact

        self.faiss = faiss
        x = np.ascontiguousarray(features, np.float32)
        self.n, self.dim = x.shape
        self.sq = (
            np.concatenate(
                [
                    np.einsum("ij,ij->i", b, b)
                    for b in (x[a : a + 65536].astype(np.float64) for a in range(0, self.n, 65536))
                ]
            )
            if self.n
            else np.zeros(0)
        )
        self.norms = np.sqrt(self.sq)
        self.features = x
        self.max_sq = float(self.sq.max(initial=0.0))
        # [x, ||x||^2]: nearest rows by <., [2q, -1]>, farthest by <., [-2q, 1]>
        # (one index for both)
        self.far: faiss.Index = faiss.IndexFlatIP(self.dim + 1)
        self.ip: faiss.Index = faiss.IndexFlatIP(self.dim)  # unit vectors: cosine
        for a in range(0, self.n, 65536):  # in blocks: no full-size temporaries
            block = x[a : a + 65536]
            self.far.add(
                np.concatenate([block, self.sq[a : a + 65536].astype(np.float32)[:, None]], axis=1)
            )
            unit = block.copy()
            faiss.normalize_L2(unit)
            self.ip.add(unit)
        self.on_gpu = False
        if use_gpu and hasattr(faiss, "StandardGpuResources"):
            res = faiss.StandardGpuResources()
            self.ip, self.far = (faiss.index_cpu_to_gpu(res, 0, i) for i in (self.ip, self.far))
            self._gpu_resources = res
            self.on_gpu = True

    @property
    def nbytes(self) -> int:
        """Bytes held by the two flat indexes and the float64 norms."""
        return int(self.n * (2 * self.dim + 1) * 4 + self.sq.nbytes * 2)

    def _search(self, index, q: np.ndarray, k: int, allowed: np.ndarray | None):
        k = min(k, self.n)
        sel, bits = _selector(self.faiss, allowed)
        params = (
            # faiss's stub lacks the keyword arguments its Python wrapper accepts
            self.faiss.SearchParameters(sel=sel)  # type: ignore[call-arg]
            if sel is not None and not self.on_gpu
            else None
        )
        values, ids = index.search(q[None].astype(np.float32), k, params=params)
        values, ids = values[0], ids[0]
        keep = ids >= 0
        values, ids = values[keep], ids[keep]
        if allowed is not None and self.on_gpu:  # GPU indexes take no selector: filter afterwards
            keep = allowed[ids]
            values, ids = values[keep], ids[keep]
        return values, ids

    def _exact_ed(self, q64: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if self._exact is not None:
            return self._exact(self._query32, rows)[0]
        diff = self.features[rows].astype(np.float64) - q64
        return np.sqrt(np.einsum("ij,ij->i", diff, diff))

    def _exact_cos(self, q64: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if self._exact is not None:
            return self._exact(self._query32, rows)[1]
        qn = float(np.sqrt(q64 @ q64))
        dots = self.features[rows].astype(np.float64) @ q64
        denom = self.norms[rows] * qn
        return np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), 0.0)

    def nearest(
        self, q: np.ndarray, k: int, allowed: np.ndarray | None = None, *, by: str = "euclidean"
    ):
        """The ``k`` allowed rows nearest to ``q`` by Euclidean distance (``by="euclidean"``) or
        largest cosine (``by="cosine"``), certified exact.

        Returns
        -------
        (np.ndarray, np.ndarray) or None
            Rows (ties by row) and their exact float64 distances (or cosines); None when the
            certificate could not be had (the caller then runs the exact full pass).
        """
        self._query32 = np.asarray(q, np.float32)
        q64 = np.asarray(q, np.float64)
        available = self.n if allowed is None else int(allowed.sum())
        k = min(k, available)
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0)
        qsq = float(q64 @ q64)
        if by == "euclidean":
            # FAISS gives v = 2 q.x - ||x||^2 = ||q||^2 - ||q - x||^2 (largest first)
            index, err = (
                self.far,
                4 * (self.dim + 2) * _U * (qsq + self.max_sq + 2 * np.sqrt(qsq * self.max_sq)),
            )
            q = np.concatenate([2.0 * q64, [-1.0]]).astype(np.float32)
        else:
            index, err = (
                self.ip,
                4 * (self.dim + 1) * _U * 2,
            )  # unit vectors (the query normalised too)
            norm = np.sqrt(qsq)
            q = (q64 / norm).astype(np.float32) if norm > 0 else np.zeros_like(q64, np.float32)
        want = min(available, max(2 * k, k + 16))
        for _ in range(_MAX_ROUNDS):
            values, ids = self._search(index, np.asarray(q, np.float32), want, allowed)
            if by == "euclidean":
                exact = self._exact_ed(q64, ids)
                order = np.lexsort((ids, exact))
                if len(ids) >= available:
                    return ids[order[:k]], exact[order[:k]]
                kth = exact[order[k - 1]] ** 2
                beyond = qsq - float(
                    values[-1]
                )  # every row not returned has a squared distance >= ~this
                if beyond - err > kth + err:
                    return ids[order[:k]], exact[order[:k]]
            else:
                exact = self._exact_cos(q64, ids)
                order = np.lexsort((ids, -exact))
                if len(ids) >= available:
                    return ids[order[:k]], exact[order[:k]]
                kth = exact[order[k - 1]]
                beyond = float(values[-1])  # every row not returned has a float32 cosine <= this
                if beyond + err < kth - err:
                    return ids[order[:k]], exact[order[:k]]
            if want >= available:
                break
            want = min(available, 4 * want)
        return None

    def max_distance(self, q: np.ndarray, live: np.ndarray | None = None) -> float | None:
        """Exact ``ED_max`` over the live rows (float64), or None when not certified."""
        self._query32 = np.asarray(q, np.float32)
        q64 = np.asarray(q, np.float64)
        available = self.n if live is None else int(live.sum())
        if available == 0:
            return 0.0
        qsq = float(q64 @ q64)
        probe = np.concatenate([-2.0 * q64, [1.0]]).astype(np.float32)
        err = 4 * (self.dim + 2) * _U * (2 * np.sqrt(qsq * self.max_sq) + self.max_sq)
        want = min(available, 16)
        for _ in range(_MAX_ROUNDS):
            values, ids = self._search(self.far, probe, want, live)
            exact = self._exact_ed(q64, ids)
            best = float(exact.max(initial=0.0))
            if len(ids) >= available:
                return best
            beyond = (
                float(values[-1]) + qsq
            )  # an upper estimate of every other row's squared distance
            if beyond + err < best**2 - err:
                return best
            want = min(available, 4 * want)
        return None
