"""Indexing on a Dask cluster gives the store one process gives; faults lose or duplicate nothing.

A LocalCluster of 2 worker processes (1 thread each) against the same folder indexed in one
process: 32 synthetic lesions, a file that is no image and a copy of another file's bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from dermris.core.errors import ConfigError, OptionalDependencyError
from dermris.indexer import (
    ClusterError,
    ClusterSpec,
    Store,
    check_store,
    index_folder,
    parse_cluster,
)

from reference import NAMES, brute_force, load_store, row_query

distributed = pytest.importorskip("distributed")

BLOCK = 8
BATCH = 4


@pytest.fixture(scope="module")
def folder(synthetic_set, tmp_path_factory):
    images, csv = synthetic_set
    root = tmp_path_factory.mktemp("cluster") / "images"
    shutil.copytree(images, root)
    (root / "SYN_not_an_image.jpg").write_bytes(b"this is no JPEG")
    shutil.copy(images / "SYN_globular_000.jpg", root / "zz_duplicate.jpg")
    return root, csv


@pytest.fixture(scope="module")
def weights(tiny_model, tmp_path_factory):
    from dermris.models import save_model

    path = tmp_path_factory.mktemp("cluster-model") / "tiny.safetensors"
    save_model(tiny_model, path)
    return path


@pytest.fixture(scope="module")
def single(folder, weights, tmp_path_factory):
    """The folder indexed in one process: what every cluster run must reproduce."""
    images, csv = folder
    store = tmp_path_factory.mktemp("cluster-single") / "store"
    report = index_folder(
        images,
        store,
        weights=weights,
        metadata=csv,
        device="cpu",
        batch_size=BATCH,
        workers=0,
        progress=False,
    )
    assert report.indexed == 32 and len(report.duplicates) == 1 and len(report.rejected) == 1
    return store, report


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def _cluster_index(images, store, csv, weights, cluster, **kwargs):
    return index_folder(
        images,
        store,
        weights=weights,
        metadata=csv,
        device="cpu",
        batch_size=BATCH,
        block_size=BLOCK,
        cluster=cluster,
        progress=False,
        **kwargs,
    )


def assert_same_store(got, expected, *, resumed=False):
    """Same rows (by sha256, in order), metadata, rejects; vectors within tolerance; equal masks.

    After a resume, a copy of bytes committed before the kill is "already in the store", not a
    duplicate (as in one process).
    """
    a, b = Store.open(got), Store.open(expected)
    assert a.rows == b.rows > 0
    assert (
        a.codec.stage_scales == b.codec.stage_scales
    )  # fitted on the same first batch as in one process
    ma, mb = a.metadata(), b.metadata()
    assert ma.column_names == mb.column_names
    for name in ma.column_names:
        assert ma.column(name).to_pylist() == mb.column(name).to_pylist(), name
    np.testing.assert_allclose(a.features(), b.features(), rtol=1e-4, atol=1e-5)
    sa, sb = a.style_block(0, a.rows), b.style_block(0, b.rows)
    scale = np.abs(sb).max(axis=1, keepdims=True)
    np.testing.assert_allclose(sa / scale, sb / scale, rtol=0, atol=2e-3)
    np.testing.assert_array_equal(a.masks(), b.masks())
    np.testing.assert_array_equal(a.mask_areas(), b.mask_areas())

    def rejects(store):
        return sorted(
            (r.path, r.reason)
            for r in store.rejected
            if not (resumed and r.reason.startswith("same bytes"))
        )

    assert rejects(a) == rejects(b)
    report = check_store(got, full=True)
    assert report.ok, report.problems


def assert_exact(store):
    """The retriever on the cluster's store equals the independent brute force."""
    from dermris.retriever import MEASURES, Retriever

    data = load_store(store)
    retriever = Retriever.open(store, device="cpu")
    for row in (0, data["n"] // 2, data["n"] - 1):
        expected = brute_force(data, *row_query(data, row), exclude_row=row, k=5)
        got = retriever.search(row, k=5, measures=MEASURES)
        for name in NAMES:
            assert [h.row for h in got[name]] == [r for r, _ in expected[name]], name
            np.testing.assert_allclose(
                [h.score for h in got[name]], [s for _, s in expected[name]], rtol=1e-9, atol=1e-12
            )


@pytest.mark.slow
def test_two_workers_give_the_store_of_one_process(folder, weights, single, client, tmp_path):
    images, csv = folder
    store = tmp_path / "store"
    report = _cluster_index(images, store, csv, weights, client)
    expected = single[1]
    assert report.indexed == expected.indexed == 32
    assert report.duplicates == expected.duplicates and report.rejected == expected.rejected
    assert report.cluster["blocks"] == 5 and report.cluster["block_size"] == BLOCK
    assert report.cluster["workers"] == 2 and report.device == "cpu"
    assert {"setup", "cluster", "embed", "write", "derived"} <= set(report.stages)
    assert_same_store(store, single[0])
    assert_exact(store)
    from click.testing import CliRunner

    from dermris.app.cli import main

    checked = CliRunner().invoke(main, ["check", str(store), "--full"])
    assert checked.exit_code == 0, checked.output
    again = index_folder(images, store, metadata=csv, device="cpu", cluster=client, progress=False)
    assert again.indexed == 0 and again.already_indexed == 32 and again.rows == 32
    assert len(again.duplicates) == 1  # the copy: same bytes as a stored image, counted once
    assert (
        again.cluster["block_size"] == 16 and again.cluster["blocks"] == 3
    )  # at most 34 / (4 x 2), a batch at least


class _KillOnce(distributed.WorkerPlugin):
    """SIGKILL the worker 0.1 s into the first block it runs (the model is loaded before any
    block; a block of 16 tiny images takes several times that), once: the first worker there
    creates the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def transition(self, key, start, finish, **kwargs):
        if finish != "executing" or "dermris-block-" not in str(key):
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(key).encode())
        os.close(fd)
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGKILL)).start()


@pytest.mark.slow
def test_worker_killed_mid_block_loses_and_duplicates_nothing(
    folder, weights, single, client, tmp_path
):
    images, csv = folder
    marker = tmp_path / "killed"
    pids = set(client.run(os.getpid).values())
    client.register_plugin(_KillOnce(str(marker)), name="dermris-kill-once")
    try:
        address = client.scheduler_info(n_workers=0)["address"]
        store = tmp_path / "store"
        report = index_folder(
            images,
            store,
            weights=weights,
            metadata=csv,
            device="cpu",
            batch_size=BATCH,
            block_size=16,
            cluster=address,
            progress=False,
        )  # by address: tcp://HOST:PORT
    finally:
        client.unregister_worker_plugin("dermris-kill-once")
    assert marker.is_file(), "no worker was killed"
    killed_key = marker.read_text()
    # the scheduler saw the killed block go to a worker twice: recomputed, and committed once
    starts = [t for t in client.story(killed_key) if len(t) > 2 and t[2] == "processing"]
    assert len(starts) >= 2, client.story(killed_key)
    assert set(client.run(os.getpid).values()) != pids  # the nanny started a new worker
    assert report.indexed == 32 and report.rows == 32
    assert_same_store(store, single[0])


def _cli(images, store, csv, weights):
    code = "import sys; from dermris.app.cli import main; sys.exit(main())"
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "index",
            str(images),
            str(store),
            "--weights",
            str(weights),
            "--metadata",
            str(csv),
            "--cluster",
            "local:2",
            "--block-size",
            "4",
            "--batch-size",
            str(BATCH),
            "--commit-every",
            "4",
            "--device",
            "cpu",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


@pytest.mark.slow
def test_client_killed_then_rerun_resumes(folder, weights, single, tmp_path):
    images, csv = folder
    store = tmp_path / "store"
    proc = _cli(images, store, csv, weights)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads((store / "manifest.json").read_text())["rows"] >= 4:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        proc.send_signal(
            signal.SIGKILL
        )  # the client only: its worker processes see it die and exit
        proc.wait()
        group_gone = time.monotonic() + 30
        while time.monotonic() < group_gone:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the workers of a killed client kept running")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    committed = Store.open(store).rows
    assert 4 <= committed < 32
    rerun = _cli(images, store, csv, weights)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode()[-3000:]
    assert out.decode().startswith(f"indexed {32 - committed}, ")  # only what was not committed
    assert_same_store(store, single[0], resumed=True)


@pytest.mark.slow
def test_scheduler_file(client, tmp_path):
    from dermris.indexer.cluster import connect

    scheduler_file = tmp_path / "scheduler.json"  # what `dask scheduler --scheduler-file` writes
    scheduler_file.write_text(
        json.dumps({"type": "Scheduler", "address": client.scheduler_info()["address"]})
    )
    with connect(str(scheduler_file)) as session:
        assert session.workers == 2 and session.torch_threads is None


def test_workers_undo_dasks_malloc_setting(monkeypatch):
    """Dask's MALLOC_TRIM_THRESHOLD_ (set in every worker) made torch 2.4x slower there."""
    import platform

    from dermris.indexer.blocks import _restore_malloc

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert not _restore_malloc()  # not a Dask worker: left alone
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    assert _restore_malloc() == (platform.libc_ver()[0] == "glibc")


def test_default_block_size():
    from dermris.indexer.coordinator import default_block_size

    # whole style shards (207 rows for tiny and lite0, 64 for paper), at least 256 files
    assert default_block_size(shard_rows=207, files=100_000, workers=8, batch_size=16) == 414
    assert default_block_size(shard_rows=64, files=100_000, workers=8, batch_size=64) == 256
    # few files: about four blocks per worker, never less than a batch
    assert default_block_size(shard_rows=64, files=512, workers=2, batch_size=16) == 64
    assert default_block_size(shard_rows=64, files=40, workers=4, batch_size=16) == 16


# -- the --cluster value, and clear errors --------------------------------------------------
@pytest.mark.parametrize(
    "text, spec",
    [
        ("local", ClusterSpec("local")),
        ("local:3", ClusterSpec("local", workers=3)),
        ("cuda", ClusterSpec("cuda")),
        ("cuda:2", ClusterSpec("cuda", workers=2)),
        ("tcp://10.0.0.5:8786", ClusterSpec("address", address="tcp://10.0.0.5:8786")),
        (
            "tls://scheduler.example.org:8786/",
            ClusterSpec("address", address="tls://scheduler.example.org:8786"),
        ),
        ("/shared/scheduler.json", ClusterSpec("scheduler-file", address="/shared/scheduler.json")),
    ],
)
def test_cluster_values(text, spec):
    assert parse_cluster(text) == spec
    assert parse_cluster(str(spec)) == spec


@pytest.mark.parametrize(
    "text", ["", "local:0", "local:two", "gpu", "tcp://host", "http://host:80", "tcp://h:99999"]
)
def test_malformed_cluster_values(text):
    with pytest.raises(ConfigError):
        parse_cluster(text)


def test_cluster_errors_are_one_line(tmp_path, synthetic_set, monkeypatch):
    from click.testing import CliRunner

    from dermris.app.cli import main
    from dermris.indexer.cluster import connect

    images, _ = synthetic_set
    result = CliRunner().invoke(
        main, ["index", str(images), str(tmp_path / "s"), "--cluster", "local:x"]
    )
    assert result.exit_code == 2 and "must be a positive integer" in result.output
    result = CliRunner().invoke(
        main, ["index", str(images), str(tmp_path / "s"), "--block-size", "4"]
    )
    assert result.exit_code == 2 and "--block-size needs --cluster" in result.output
    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:1"):
        with connect("tcp://127.0.0.1:1", connect_timeout_s=1):
            pass
    with pytest.raises(ClusterError, match="scheduler file not found"):
        with connect(str(tmp_path / "scheduler.json"), connect_timeout_s=0.5):
            pass
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        with pytest.raises(OptionalDependencyError, match=r"dermris\[dask-cuda\]"):
            with connect("cuda"):
                pass
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(OptionalDependencyError, match=r"dermris\[dask\]"):
        with connect("local:1"):
            pass
    assert not (tmp_path / "s").exists()  # nothing was created by a run that could not start


@pytest.mark.slow
def test_blocks_smaller_than_a_batch_fit_the_codec_as_one_process(
    folder, weights, single, client, tmp_path
):
    """The float16 scales come from the first batch of the run, not from the first block."""
    images, csv = folder
    store = tmp_path / "store"
    index_folder(
        images,
        store,
        weights=weights,
        metadata=csv,
        device="cpu",
        batch_size=BATCH * 4,
        block_size=2,
        cluster=client,
        progress=False,
    )
    expected = tmp_path / "single"
    index_folder(
        images,
        expected,
        weights=weights,
        metadata=csv,
        device="cpu",
        batch_size=BATCH * 4,
        workers=0,
        progress=False,
    )
    assert_same_store(store, expected)


# -- the dashboard of a cluster started here ---------------------------------------------------
def test_local_cluster_dashboard_is_on_loopback_unless_asked(monkeypatch, tmp_path, synthetic_set):
    """Guards against ``--cluster local`` starting Dask's dashboard (no authentication) on
    every interface (``0.0.0.0:8787``, distributed's default): loopback by default, off or
    elsewhere only when asked with ``--dashboard``."""
    from click.testing import CliRunner

    import dermris.indexer
    from dermris.app.cli import main
    from dermris.indexer.cluster import DEFAULT_DASHBOARD, local_cluster_options, parse_dashboard

    options = local_cluster_options(parse_cluster("local:2"))
    assert options["dashboard_address"] == DEFAULT_DASHBOARD == "127.0.0.1:8787"
    assert options["host"] == "127.0.0.1" and options["n_workers"] == 2
    off = ClusterSpec("local", 2, dashboard=parse_dashboard("off"))
    assert local_cluster_options(off)["dashboard_address"] is None
    assert parse_dashboard("9000") == "127.0.0.1:9000"
    assert parse_dashboard(":8787") == ":8787"  # every interface, when asked in so many words
    assert parse_dashboard("10.0.0.5:8787") == "10.0.0.5:8787"
    with pytest.raises(ConfigError, match="not a dashboard address"):
        parse_dashboard("http://0.0.0.0:8787/status")

    images, _ = synthetic_set
    seen = []

    def fake_index_folder(*args, cluster=None, **kwargs):
        seen.append(cluster)
        raise ClusterError("stopped by the test")

    monkeypatch.setattr(dermris.indexer, "index_folder", fake_index_folder)
    runner = CliRunner()
    store = str(tmp_path / "s")
    for flags, dashboard in [
        ([], "127.0.0.1:8787"),
        (["--dashboard", "off"], None),
        (["--dashboard", "8788"], "127.0.0.1:8788"),
    ]:
        result = runner.invoke(main, ["index", str(images), store, "--cluster", "local:2", *flags])
        assert result.exit_code == 1 and "stopped by the test" in result.output, result.output
        assert seen[-1].dashboard == dashboard
    result = runner.invoke(main, ["index", str(images), store, "--dashboard", "off"])
    assert result.exit_code == 2 and "--dashboard needs --cluster local or cuda" in result.output
    result = runner.invoke(
        main, ["index", str(images), store, "--cluster", "local", "--dashboard", "x:y"]
    )
    assert result.exit_code == 2 and "not a dashboard address" in result.output


@pytest.mark.slow
def test_started_local_cluster_serves_its_dashboard_on_loopback_only():
    """The same, on a started cluster: the dashboard's sockets are bound to 127.0.0.1, and a
    cluster asked for no dashboard has none."""
    from dermris.indexer.cluster import connect

    def bound(dask_scheduler):
        server = dask_scheduler.http_server
        return sorted({s.getsockname()[0] for s in server._sockets.values()}) if server else []

    def status(link: str) -> int:
        try:
            with urllib.request.urlopen(link, timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code

    with connect("local:1") as session:
        link = session.dashboard
        assert link is not None and link.startswith("http://127.0.0.1:")
        assert session.client.run_on_scheduler(bound) == ["127.0.0.1"]
        assert status(link) == 200
    with connect(ClusterSpec("local", 1, dashboard=None)) as session:
        assert session.dashboard is None
        # the scheduler's own HTTP routes (health, metrics) remain, on loopback
        assert session.client.run_on_scheduler(bound) in ([], ["127.0.0.1"])


# -- work whose workers keep dying ---------------------------------------------------------------
class _Future:
    def __init__(self, fn, key):
        self.fn, self.key = fn, key

    def result(self):
        if self.fn.__name__ in self.dying:
            raise distributed.KilledWorker(self.key, _Worker(), 3)
        return "cpu"


class _Worker:
    address = "tcp://127.0.0.1:40001"


class _DyingClient:
    """A client whose workers die running the tasks of the functions named in ``dying``."""

    direct_to_workers = None
    dashboard_link = None

    def __init__(self, *dying):
        _Future.dying = set(dying)

    def scheduler_info(self, n_workers=0):
        return {"address": "tcp://127.0.0.1:40000", "workers": {_Worker.address: {}}}

    def wait_for_workers(self, n, timeout=None):
        pass

    def submit(self, fn, *args, key=None, **kwargs):
        return _Future(fn, key)

    def gather(self, futures, **kwargs):
        return [f.result() for f in futures] if isinstance(futures, list) else futures.result()

    def scatter(self, data, **kwargs):
        return data

    def cancel(self, futures):
        pass


@pytest.mark.parametrize(
    ("dying", "says"),
    [
        ("first_batch_style", "the first batch of the new store .* died 4 times"),
        ("warm_up", "loading the model on the workers: the worker running it died 4 times"),
    ],
)
def test_new_store_whose_first_batch_kills_its_worker_is_one_line(
    folder, weights, tmp_path, dying, says
):
    """Guards against a raw ``KilledWorker`` (a traceback naming dask's internals) when the
    first batch of a new store (which sets its float16 scales), or loading the model, kills
    every worker that runs it: a ClusterError of one line that says what to do."""
    images, csv = folder
    with pytest.raises(ClusterError, match=says) as exc_info:
        _cluster_index(images, tmp_path / "store", csv, weights, _DyingClient(dying))
    message = str(exc_info.value)
    assert "\n" not in message and "more memory" in message and "KilledWorker" not in message
    assert Store.open(tmp_path / "store").rows == 0 if (tmp_path / "store").exists() else True
