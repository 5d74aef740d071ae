"""``where=`` text is parsed, never evaluated: filters that would run code if evaluated are
refused with one clear line, and the code never runs."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from dermris.app.cli import main
from dermris.core.errors import QueryError
from dermris.retriever import Retriever
from dermris.retriever.filters import parse_where

# Each filter creates the file MARKER (in the working directory) if any part of it is evaluated;
# every one of them would also parse as a comparison if that part were taken for a literal.
PAYLOADS = [
    "diagnosis == __import__('pathlib').Path('MARKER').touch()",
    "age > (__import__('os').system('touch MARKER') or 1)",
    "col('x') == open('MARKER', 'w').close()",
    "age > len(open('MARKER', 'w').name)",
    "age >= [open('MARKER', 'w'), 1][1]",
    "diagnosis in (open('MARKER', 'w').close(), 'mel')",
    "diagnosis not in ['nev', __import__('pathlib').Path('MARKER').write_text('x')]",
    "is_null(open('MARKER', 'w'))",
    "diagnosis == 'mel' or __import__('pathlib').Path('MARKER').touch()",
    "not __import__('pathlib').Path('MARKER').exists() and age > 1",
    "30 <= age < (lambda: open('MARKER', 'w') and 60)()",
    "age == -(__import__('pathlib').Path('MARKER').touch() or 1)",
    "diagnosis == f\"{open('MARKER', 'w')}\"",
]


def _labels(n: int) -> dict:
    return {
        "diagnosis": [["mel", "nev", "bcc"][i % 3] for i in range(n)],
        "age": [20 + i for i in range(n)],
        "x": [i % 2 for i in range(n)],
    }


def _assert_refused(exc_info, tmp_path):
    message = str(exc_info.value)
    assert message.startswith("where:") and "\n" not in message, message
    assert not (tmp_path / "MARKER").exists(), "the filter's code ran"


@pytest.mark.parametrize("where", PAYLOADS)
def test_code_in_a_filter_is_refused_not_run(tmp_path, monkeypatch, where):
    """Guards against the where parser evaluating non-literal operands (``eval()`` of an
    operand it does not recognise): a QueryError of one line, and MARKER never appears."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QueryError) as exc_info:
        parse_where(where)
    _assert_refused(exc_info, tmp_path)


def test_code_in_a_search_filter_is_refused_not_run(tmp_path, monkeypatch, random_store):
    """The same eval bug through ``Retriever.search(where=...)`` and ``dermris search
    --where``: refused before any row is ranked, and nothing runs."""
    path = random_store(n=12, seed=81, extra_columns=_labels(12))
    retriever = Retriever.open(path, device="cpu")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert retriever.search(0, where="diagnosis == 'mel' and age > 22", k=20)["style"]
    for where in PAYLOADS:
        with pytest.raises(QueryError) as exc_info:
            retriever.search(0, measures="all", k=3, where=where)
        _assert_refused(exc_info, work)
    runner = CliRunner()
    for where in PAYLOADS[:4]:
        result = runner.invoke(main, ["search", str(path), "--row", "0", "--where", where])
        assert result.exit_code == 1, result.output
        assert "where:" in result.output
        assert not (work / "MARKER").exists(), "the filter's code ran"
