"""The README's quickstart, run as written.

Every fenced block that follows an HTML comment ``<!-- tested -->`` in README.md (and in
docs/python.md) is executed: ``bash`` blocks line by line (``dermris ...`` through the installed
command-line entry point, ``dermris serve`` as a real process until ``/api/health`` answers),
``python`` blocks with ``exec``. A block after ``<!-- tested: make -n -->`` is an install block:
its ``make`` targets are dry-run (``make -n``) and ``source .venv/bin/activate`` is checked to
exist next to the running interpreter.

The blocks run in a temporary folder holding what ``make demo`` writes (``dermris-demo/`` with
``data/images/``, ``data/metadata.csv`` and ``query.jpg``), with two documented substitutions:

* ``dermris-demo/store-lite0`` is the suite's shared store (the 32 synthetic lesions of
  ``make demo``, indexed with the ``tiny`` preset: building a lite0 store would cost a minute);
* ``--port 8000`` becomes a free port.

``my-images/`` is made of 8 small synthetic lesions with a ``metadata.csv``, ``lesion.jpg`` is
one more lesion. Indexing builds a model (tens of seconds on 2 cores), so the block that runs
``dermris index`` is marked slow.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from dermris.app.cli import main

from live_server import free_port

ROOT = Path(__file__).resolve().parents[1]
DEMO_STORE = "dermris-demo/store-lite0"

_BLOCK = re.compile(
    r"<!--\s*tested(?P<mode>:[^>]*)?\s*-->\s*\n```(?P<lang>\w+)\n(?P<body>.*?)\n```", re.DOTALL
)


def _tested_blocks(path: Path) -> list[tuple[str, str, str]]:
    """``(mode, language, text)`` of every block marked ``<!-- tested -->`` in ``path``."""
    return [
        ((m["mode"] or "").lstrip(":").strip(), m["lang"], m["body"])
        for m in _BLOCK.finditer(path.read_text("utf-8"))
    ]


def _commands(text: str) -> list[list[str]]:
    """The shell lines of a block as argument lists (comments dropped, continuations joined)."""
    return [shlex.split(line, comments=True) for line in text.replace("\\\n", " ").splitlines()]


README = _tested_blocks(ROOT / "README.md")
PYTHON_DOC = _tested_blocks(ROOT / "docs" / "python.md")
COMMANDS = [
    args for mode, lang, text in README if lang == "bash" and not mode for args in _commands(text)
]
INSTALL = [args for mode, _, text in README if mode == "make -n" for args in _commands(text)]
SNIPPETS = [(f"README-{i}", text) for i, (_, lang, text) in enumerate(README) if lang == "python"]
SNIPPETS += [
    (f"python.md-{i}", text) for i, (_, lang, text) in enumerate(PYTHON_DOC) if lang == "python"
]


def _uses_model_build(args: list[str]) -> bool:
    return args[:2] == ["dermris", "index"]


def test_the_readme_has_tested_blocks_for_every_quickstart_step():
    verbs = {args[1] for args in COMMANDS if args and args[0] == "dermris"}
    assert {"index", "search", "serve", "evaluate"} <= verbs
    assert {args[1] for args in INSTALL if args[:1] == ["make"]} == {"demo"}
    assert SNIPPETS and any(name.startswith("README") for name, _ in SNIPPETS)
    text = (ROOT / "README.md").read_text("utf-8")
    assert "make install" in text and ".venv/bin/dermris" in text
    assert "source .venv/bin/activate" in text


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory, synthetic_set):
    """A working folder as ``make demo`` leaves it, plus ``my-images/`` and ``lesion.jpg``."""
    from dermris.indexer.synthetic import synthetic_lesion, write_synthetic_set

    images, csv = synthetic_set
    cwd = tmp_path_factory.mktemp("readme")
    data = cwd / "dermris-demo" / "data"
    data.mkdir(parents=True)
    (data / "images").symlink_to(images, target_is_directory=True)
    (data / "metadata.csv").symlink_to(csv)
    synthetic_lesion("reticular", seed=999_999, size=160).image.save(
        cwd / "dermris-demo" / "query.jpg", quality=92
    )
    made = write_synthetic_set(cwd / "made", per_class=2, size=96, seed=5)
    (cwd / "my-images").mkdir()
    for jpg in sorted((made.parent / "images").glob("*.jpg")):
        jpg.rename(cwd / "my-images" / jpg.name)
    made.rename(cwd / "my-images" / "metadata.csv")
    synthetic_lesion("globular", seed=424_242, size=96).image.save(cwd / "lesion.jpg", quality=92)
    return cwd


def _substitute(args: list[str], store: Path, port: int) -> list[str]:
    out = [str(store) + a[len(DEMO_STORE) :] if a.startswith(DEMO_STORE) else a for a in args]
    return [str(port) if prev == "--port" else a for prev, a in zip(["", *out], out)]


@contextlib.contextmanager
def _chdir(path: Path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _serve(args: list[str], cwd: Path) -> None:
    """``dermris serve ...`` as a process of the installed command, until /api/health answers."""
    dermris = Path(sys.executable).parent / "dermris"
    command = [str(dermris) if dermris.exists() else "dermris", *args[1:]]
    port = args[args.index("--port") + 1]
    proc = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as r:
                    assert b'"status":"ok"' in r.read()
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    assert b"dermris search" in r.read()
                break
            except OSError:
                assert time.monotonic() < deadline, "dermris serve did not answer"
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)


def _command_params() -> list:
    params = []
    for i, args in enumerate(COMMANDS):
        marks = [pytest.mark.slow] if any(_uses_model_build(a) for a in COMMANDS[: i + 1]) else []
        # a block's later lines use what its `dermris index` made: they run after it, slow too
        params.append(pytest.param(i, id=" ".join(args[:3]) + f"-{i}", marks=marks))
    return params


@pytest.mark.parametrize("index", _command_params())
def test_readme_command(index, demo_folder, indexed_store):
    args = _substitute(COMMANDS[index], indexed_store, free_port())
    assert args[0] == "dermris", args
    if args[1] == "serve":
        _serve(args, demo_folder)
        return
    if args[1] != "index" and "my-store" in args and not (demo_folder / "my-store").exists():
        # this line needs the store an earlier line of its block indexes
        earlier = next(a for a in COMMANDS[:index] if _uses_model_build(a))
        with _chdir(demo_folder):
            done = CliRunner().invoke(main, earlier[1:] + ["-q"])
        assert done.exit_code == 0, done.output
    with _chdir(demo_folder):
        result = CliRunner().invoke(main, args[1:], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    if args[1] == "search":
        assert re.search(r"\bSYN_\w+", result.stdout), result.stdout
    if args[1] == "evaluate":
        assert "precision" in result.stdout.lower(), result.stdout
    if args[1] == "index":
        assert (demo_folder / "my-store" / "manifest.json").exists()


def test_readme_install_block():
    for args in INSTALL:
        if args[0] == "make":
            dry = subprocess.run(
                ["make", "-n", *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60
            )
            assert dry.returncode == 0, dry.stderr
        elif args[0] == "source":
            if sys.prefix == sys.base_prefix:
                pytest.skip("not running in a virtual environment")
            # the README's .venv is the environment `make` makes and runs the tests in
            assert (Path(sys.prefix) / args[1].removeprefix(".venv/")).exists()
            assert (Path(sys.prefix) / "bin" / "dermris").exists()
        else:
            raise AssertionError(f"unexpected install line {args}")


@pytest.mark.parametrize("name", [name for name, _ in SNIPPETS])
def test_readme_python_snippet(name, demo_folder, indexed_store, capsys):
    code = dict(SNIPPETS)[name].replace(DEMO_STORE, str(indexed_store))
    with _chdir(demo_folder):
        exec(compile(code, name, "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    assert re.search(r"\bSYN_\w+", printed), printed
    assert re.search(r"\d+ ms|\d\.\d{3} s", printed), printed  # stats.seconds is a number
