"""Where ``dermris index --cluster`` runs: the cluster spec, and a Dask client connected to it.

=====================  ==========================================================================
spec                   cluster
=====================  ==========================================================================
``local[:N]``          a ``distributed.LocalCluster`` of N worker processes on this machine
                       (default: one per core), one thread each, the cores shared out as torch
                       threads
``cuda[:N]``           a ``dask_cuda.LocalCUDACluster``: one worker per GPU (the first N GPUs)
``tcp://HOST:PORT``    an existing scheduler (also ``tls://``, ``ucx://``, ``ws://``, ``wss://``),
                       started by dask-jobqueue, dask-kubernetes, or ``dask scheduler`` by hand
``PATH.json``          the scheduler file of an existing scheduler (``--scheduler-file``)
=====================  ==========================================================================

A cluster started here (``local``, ``cuda``) listens on loopback only, and serves Dask's
dashboard (which has no authentication) on :data:`DEFAULT_DASHBOARD`, this machine only,
unless :attr:`ClusterSpec.dashboard` says otherwise (``dermris index --dashboard``).

:func:`parse_cluster` imports nothing heavy (the command line validates ``--cluster`` with it);
dask is imported only when :func:`connect` starts or reaches a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermris.core.errors import ClusterError, ConfigError, OptionalDependencyError

__all__ = [
    "ClusterSpec",
    "ClusterSession",
    "DEFAULT_DASHBOARD",
    "parse_cluster",
    "parse_dashboard",
    "local_cluster_options",
    "as_cluster",
    "connect",
]

log = logging.getLogger(__name__)

_SCHEMES = ("tcp", "tls", "ucx", "ucxx", "ws", "wss")
_ADDRESS = re.compile(
    r"^(?P<scheme>[a-z]+)://(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})/?$"
)
_CONNECT_TIMEOUT_S = 30.0
_WORKER_WAIT_S = 600.0
_LOOPBACK = "127.0.0.1"
DEFAULT_DASHBOARD = f"{_LOOPBACK}:8787"
"""Where a cluster started here serves Dask's dashboard: this machine only (another free
port when 8787 is taken)."""
_DASHBOARD = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]*):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class ClusterSpec:
    """A parsed ``--cluster`` value.

    Attributes
    ----------
    kind : str
        ``"local"``, ``"cuda"``, ``"address"`` (an existing scheduler) or ``"scheduler-file"``.
    workers : int, optional
        Worker processes (local) or GPUs (cuda) to start; None: the default.
    address : str, optional
        The scheduler address or scheduler file (kinds ``address`` and ``scheduler-file``).
    dashboard : str, optional
        ``HOST:PORT`` of the Dask dashboard of a cluster started here (``local``, ``cuda``);
        None: no dashboard (the scheduler's own health and metrics routes stay on loopback).
        Default: :data:`DEFAULT_DASHBOARD` (loopback). An existing scheduler keeps its own.
    """

    kind: str
    workers: int | None = None
    address: str | None = None
    dashboard: str | None = DEFAULT_DASHBOARD

    def __str__(self) -> str:
        if self.kind in ("local", "cuda"):
            return self.kind + (f":{self.workers}" if self.workers is not None else "")
        return str(self.address)


def parse_cluster(text: str) -> ClusterSpec:
    """Parse a ``--cluster`` value (see the module docstring).

    Raises
    ------
    ConfigError
        A value that is none of the accepted forms (the message says which are).
    """
    value = str(text).strip()
    accepted = "local[:N], cuda[:N], tcp://HOST:PORT or a scheduler file (*.json)"
    head, sep, tail = value.partition(":")
    if head in ("local", "cuda") and not tail.startswith("//"):
        if not sep:
            return ClusterSpec(head)
        if not tail.isdigit() or int(tail) < 1:
            raise ConfigError(f"{value!r}: the number after '{head}:' must be a positive integer")
        return ClusterSpec(head, workers=int(tail))
    if "://" in value:
        match = _ADDRESS.match(value)
        if match is None or match["scheme"] not in _SCHEMES or not 0 < int(match["port"]) < 65536:
            raise ConfigError(
                f"{value!r} is not a scheduler address like tcp://HOST:PORT "
                f"(schemes: {', '.join(_SCHEMES)})"
            )
        return ClusterSpec("address", address=value.rstrip("/"))
    if value.endswith(".json"):
        return ClusterSpec("scheduler-file", address=value)
    raise ConfigError(f"{value!r} is not a cluster: expected {accepted}")


def parse_dashboard(text: str | None) -> str | None:
    """Parse a ``--dashboard`` value: ``HOST:PORT``, ``PORT`` (on loopback), ``:PORT`` (every
    interface: anyone who can reach this machine sees the dashboard), or ``off``.

    Raises
    ------
    ConfigError
        Anything else.
    """
    if text is None:
        return None
    value = str(text).strip()
    if value.lower() in ("off", "none", "no", "false", ""):
        return None
    if value.isdigit():
        value = f"{_LOOPBACK}:{value}"
    match = _DASHBOARD.match(value)
    if match is None or not 0 <= int(match["port"]) < 65536:
        raise ConfigError(
            f"{text!r} is not a dashboard address: expected HOST:PORT, PORT (on {_LOOPBACK}), "
            ":PORT (every interface) or off"
        )
    return value


def local_cluster_options(spec: ClusterSpec, *, cores: int | None = None) -> dict[str, Any]:
    """The keyword arguments :func:`connect` gives ``distributed.LocalCluster`` for a
    ``local`` spec: N single-threaded worker processes, scheduler and workers on loopback, and
    the dashboard where the spec says (loopback by default, or none)."""
    workers = spec.workers or cores or _cores()
    return {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "host": _LOOPBACK,
        "dashboard_address": spec.dashboard,
    }


def as_cluster(cluster: Any) -> Any:
    """Validate what ``index_folder(cluster=...)`` was given: a spec (text or
    :class:`ClusterSpec`), a ``distributed.Client``, or a Dask cluster object."""
    if isinstance(cluster, ClusterSpec):
        return cluster
    if isinstance(cluster, (str, os.PathLike)):
        return parse_cluster(os.fspath(cluster))
    if _is_client(cluster) or hasattr(cluster, "scheduler_address"):
        return cluster
    raise ConfigError(
        f"cluster must be a spec such as 'local:2', a distributed.Client or a Dask cluster, "
        f"not {type(cluster).__name__}"
    )


def _is_client(obj: Any) -> bool:
    return hasattr(obj, "submit") and hasattr(obj, "scheduler_info")


@dataclass
class ClusterSession:
    """A connected Dask client and what dermris needs to know about its cluster.

    Attributes
    ----------
    client : distributed.Client
        The client.
    name : str
        The spec or address, for messages.
    torch_threads : int, optional
        Torch threads each worker should use (set for local CPU clusters, which share this
        machine's cores between their workers); None: leave the workers' own setting.
    serves_dashboard : bool
        False for a cluster started here without a dashboard (its scheduler still answers
        Dask's health and metrics routes, on loopback).
    """

    client: Any
    name: str
    torch_threads: int | None = None
    serves_dashboard: bool = True

    @property
    def workers(self) -> int:
        """Workers connected now."""
        return len(self.client.scheduler_info(n_workers=-1).get("workers", {}))

    @property
    def dashboard(self) -> str | None:
        """The Dask dashboard's address, when the scheduler serves one."""
        if not self.serves_dashboard:
            return None
        try:
            if "dashboard" not in self.client.scheduler_info(n_workers=0).get("services", {}):
                return None
            return self.client.dashboard_link
        except Exception:  # noqa: BLE001 - the dashboard is a convenience
            return None


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise OptionalDependencyError(
            "indexing on a cluster needs dask.distributed: pip install 'dermris[dask]'"
        ) from None
    return distributed


def _cores() -> int:
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


@contextlib.contextmanager
def connect(
    cluster: Any,
    *,
    connect_timeout_s: float = _CONNECT_TIMEOUT_S,
    worker_wait_s: float = _WORKER_WAIT_S,
) -> Iterator[ClusterSession]:
    """Start or reach the cluster, yield a session with at least one worker, and close what was
    started here (a client or cluster handed in is left open).

    Parameters
    ----------
    cluster : ClusterSpec, str, distributed.Client or Dask cluster
        Where to run (:func:`as_cluster`).
    connect_timeout_s : float
        How long to try reaching an existing scheduler.
    worker_wait_s : float
        How long to wait for the first worker of an existing scheduler.

    Raises
    ------
    OptionalDependencyError
        distributed (or dask-cuda for ``cuda``) is not installed.
    ClusterError
        The scheduler cannot be reached, or no worker joins in time.
    """
    cluster = as_cluster(cluster)
    with contextlib.ExitStack() as stack:
        if _is_client(cluster):
            session = ClusterSession(
                cluster, str(cluster.scheduler_info(n_workers=0).get("address"))
            )
        elif not isinstance(cluster, ClusterSpec):
            distributed = _import_distributed()
            client = stack.enter_context(distributed.Client(cluster))
            session = ClusterSession(client, str(cluster.scheduler_address))
        else:
            session = _start(cluster, stack, connect_timeout_s)
        try:
            session.client.wait_for_workers(1, timeout=worker_wait_s)
        except TimeoutError:
            raise ClusterError(
                f"no Dask worker joined the scheduler at {session.name} "
                f"within {worker_wait_s:.0f} s "
                "(start workers with `dask worker ADDRESS`, or check the job queue)"
            ) from None
        yield session


def _start(
    spec: ClusterSpec, stack: contextlib.ExitStack, connect_timeout_s: float
) -> ClusterSession:
    distributed = _import_distributed()
    if spec.kind == "local":
        options = local_cluster_options(spec)
        workers = options["n_workers"]
        threads = max(1, _cores() // workers)
        log.info(
            "starting a local Dask cluster of %d worker processes (%d torch threads each); "
            "dashboard %s",
            workers,
            threads,
            spec.dashboard or "off",
        )
        try:
            cluster = stack.enter_context(distributed.LocalCluster(**options))
        except (RuntimeError, OSError, TimeoutError) as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            raise ClusterError(
                f"the local Dask cluster did not start ({type(exc).__name__}: {first_line}); "
                "from a Python script, call index_folder(..., cluster=...) "
                "under `if __name__ == '__main__':` (worker processes re-import the script)"
            ) from exc
        client = stack.enter_context(distributed.Client(cluster))
        return ClusterSession(
            client, str(spec), torch_threads=threads, serves_dashboard=spec.dashboard is not None
        )
    if spec.kind == "cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise OptionalDependencyError(
                "--cluster cuda needs dask-cuda: pip install 'dermris[dask-cuda]'"
            ) from None
        log.info("starting a local Dask CUDA cluster (one worker per GPU)")
        try:
            cluster = stack.enter_context(
                LocalCUDACluster(
                    n_workers=spec.workers,
                    host=_LOOPBACK,
                    dashboard_address=spec.dashboard,
                )
            )
        except (RuntimeError, OSError, TimeoutError, ValueError) as exc:
            raise ClusterError(
                f"the local Dask CUDA cluster did not start ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc
        client = stack.enter_context(distributed.Client(cluster))
        return ClusterSession(client, str(spec), serves_dashboard=spec.dashboard is not None)
    kwargs: dict[str, Any] = {"timeout": connect_timeout_s}
    if (
        spec.kind == "scheduler-file"
    ):  # written by a scheduler that may still be starting (a batch job)
        deadline = time.monotonic() + connect_timeout_s
        while not Path(str(spec.address)).is_file():
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"scheduler file not found: {spec.address} (waited {connect_timeout_s:.0f} s)"
                )
            time.sleep(0.2)
        kwargs["scheduler_file"] = spec.address
    else:
        kwargs["address"] = spec.address
    try:
        client = stack.enter_context(distributed.Client(**kwargs))
    except (OSError, TimeoutError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ClusterError(f"cannot reach the Dask scheduler at {spec.address}: {reason}") from None
    return ClusterSession(client, str(spec))
