"""The distribution: the dermris.* namespace, a non-editable install, a light command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory):
    """A new venv holding dermris from a wheel built from this checkout (not editable).

    Its own dependencies are the test environment's (a path entry, so the editable install
    of the test environment is not seen): nothing is downloaded.
    """
    work = tmp_path_factory.mktemp("install")
    wheels = work / "wheels"
    result = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(ROOT),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    wheel = next(wheels.glob("dermris-*.whl"))
    venv = work / "venv"
    result = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert result.returncode == 0, result.stderr
    python = venv / "bin" / "python"
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).stdout.strip()
    )
    (site / "_dermris_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    result = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return venv


@pytest.mark.slow  # builds a wheel and a venv
def test_wheel_installs_dermris_namespace_beside_users_own_packages(installed_venv, tmp_path):
    """In a folder with its own ``models/`` and ``retriever/``, dermris still imports and runs."""
    project = tmp_path / "research"
    for name in ("core", "models", "indexer", "retriever", "app"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(
            f"raise ImportError('the user\\'s own {name} package')\n"
        )
    python = installed_venv / "bin" / "python"
    code = (
        "import dermris.retriever as r, dermris.models as m, dermris.indexer as i, "
        "dermris.core, dermris.app.cli; "
        "from dermris.retriever import Retriever, MEASURES; "
        "print(r.__file__); print(r.__version__); print(len(MEASURES))"
    )
    result = _run([str(python), "-c", code], cwd=project)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split()
    assert (
        str(installed_venv) in lines[0] and "site-packages" in lines[0]
    )  # the wheel, not the checkout
    assert lines[1] == "0.1.0" and lines[2] == "9"
    typed = _run(
        [
            str(python),
            "-c",
            "import dermris.retriever, pathlib; "
            "print((pathlib.Path(dermris.retriever.__file__).parent / 'py.typed').is_file())",
        ],
        cwd=project,
    )
    assert typed.stdout.strip() == "True"

    demo = _run(
        [
            str(installed_venv / "bin" / "dermris"),
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--per-class",
            "2",
            "-k",
            "2",
            "--quiet",
        ],
        cwd=project,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "model: lite0 preset" in demo.stdout and "indexed 8 synthetic images" in demo.stdout
    assert demo.stderr == ""


def test_help_and_argument_errors_do_not_import_torch():
    code = (
        "import sys\n"
        "from dermris.app.cli import main\n"
        "for argv in (\n"
        "    ['--help'], ['search', '--help'], ['search', 'S', '--measure', 'dice'], ['index']\n"
        "):\n"
        "    try:\n"
        "        main(argv, prog_name='dermris')\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
    )
    result = _run([sys.executable, "-c", code])
    assert "NO-TORCH" in result.stderr, result.stderr[-2000:]
    assert "Usage: dermris" in result.stdout


def test_help_is_fast():
    """``dermris --help`` in a fresh process (README: under 1 s on the 2-core machine)."""
    exe = Path(sys.executable).parent / "dermris"
    timings = []
    for _ in range(3):
        t = time.perf_counter()
        result = _run([str(exe), "--help"])
        timings.append(time.perf_counter() - t)
        assert result.returncode == 0 and "Commands:" in result.stdout
    assert min(timings) < 3.0, timings  # generous on a shared machine; the README quotes the median


def test_every_command_has_verbose_and_quiet():
    import click

    from dermris.app.cli import main

    def commands(group, prefix=""):
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                yield from commands(cmd, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", cmd

    seen = 0
    for name, cmd in commands(main):
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        assert {"-v", "--verbose", "-q", "--quiet"} <= opts, name
        seen += 1
    assert seen >= 12


def test_atomic_writes_go_through_one_helper():
    """Files are replaced only by dermris.core.atomic (directory renames aside)."""
    allowed = {"core/atomic.py", "indexer/store/recovery.py", "indexer/store/writer.py"}
    offenders = []
    for folder in ("core", "models", "indexer", "retriever", "app"):
        for file in (ROOT / folder).rglob("*.py"):
            rel = file.relative_to(ROOT).as_posix()
            text = file.read_text()
            if rel not in allowed and re.search(
                r"os\.replace\(|os\.rename\(|\.replace\(tmp|os\.fsync\(", text
            ):
                offenders.append(rel)
            if re.search(r"\bfcntl\b", text):
                offenders.append(f"{rel} (fcntl: use filelock)")
    assert not offenders, offenders
