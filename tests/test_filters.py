"""The ``where`` language: SQL spellings beside the Python forms, and one clear line (never a
pyarrow message, an OverflowError or a traceback) for unknown or hidden columns, mixed types,
values of the wrong type and integers beyond int64."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.compute as pc
import pytest
from click.testing import CliRunner

from dermris.app.cli import main
from dermris.core.errors import QueryError
from dermris.retriever import Retriever
from dermris.retriever.filters import parse_where, rows_matching
from dermris.retriever.results import json_safe

N = 24


def _labels(n: int = N) -> dict:
    return {
        "diagnosis": [
            None if i % 7 == 6 else ["mel", "nev", "bcc", "AND"][i % 4] for i in range(n)
        ],
        "age": [20 + i for i in range(n)],
        "benign": [i % 3 != 0 for i in range(n)],
        "x": [i % 2 for i in range(n)],
        "value": [[1.5, math.inf, math.nan, -math.inf][i % 4] for i in range(n)],
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from conftest import make_random_store

    return make_random_store(
        tmp_path_factory.mktemp("filters") / "store", n=N, seed=61, extra_columns=_labels()
    )


@pytest.fixture(scope="module")
def retriever(store):
    return Retriever.open(store, device="cpu")


# SQL spelling -> the Python form it must mean
SQL_FORMS = [
    ("diagnosis = 'mel'", "diagnosis == 'mel'"),
    ("diagnosis = 'mel' AND age > 25", "diagnosis == 'mel' and age > 25"),
    ("diagnosis = 'mel' and age > 25 OR x = 1", "(diagnosis == 'mel' and age > 25) or x == 1"),
    ("NOT benign", "not benign"),
    ("Not (diagnosis <> 'nev') And age <= 40", "not (diagnosis != 'nev') and age <= 40"),
    ("diagnosis IN ('mel', 'bcc')", "diagnosis in ('mel', 'bcc')"),
    ("diagnosis NOT IN ('mel')", "diagnosis not in ('mel',)"),
    ("benign = TRUE", "benign == True"),
    ("benign = false", "benign == False"),
    ("diagnosis IS NOT NULL", "not is_null(diagnosis)"),
    ("diagnosis IS NULL", "is_null(diagnosis)"),
    ("diagnosis is None", "is_null(diagnosis)"),
    # keywords inside string literals are left alone
    ("diagnosis = 'AND' or diagnosis = 'not'", "diagnosis == 'AND' or diagnosis == 'not'"),
    ('col("diagnosis") = "AND"', "diagnosis == 'AND'"),
]


@pytest.mark.parametrize(("sql", "python"), SQL_FORMS)
def test_sql_spellings_mean_the_python_forms(retriever, sql, python):
    """Guards against ``where`` refusing SQL's ``=``, ``<>``, ``AND``/``OR``/``NOT``,
    ``IN``, ``IS [NOT] NULL``, ``TRUE``/``FALSE`` ("invalid syntax" before), and against a
    keyword inside a string literal being rewritten."""
    table = retriever.metadata()
    expected = rows_matching(table, python)
    assert expected.any() and not expected.all(), python  # the case tells something
    assert np.array_equal(rows_matching(table, sql), expected)
    hits = retriever.search(0, measures="style", k=N, where=sql)["style"]
    assert {h.row for h in hits} == set(np.flatnonzero(expected)) - {0}


def test_sql_spellings_on_the_command_line(store):
    result = CliRunner().invoke(
        main, ["search", str(store), "--row", "1", "--where", "diagnosis = 'mel' AND age > 25"]
    )
    assert result.exit_code == 0, result.output


def test_a_doubled_quote_is_refused_not_joined(store):
    """``'it''s'`` (SQL's escaped quote) would be Python's implicit join ``its``."""
    with pytest.raises(QueryError, match="two strings side by side"):
        parse_where("diagnosis = 'it''s'")


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert message.startswith("where:") and "\n" not in message, message
    assert "FieldRef" not in message and "kernel" not in message, message
    return message


@pytest.mark.parametrize(
    "where", ["nope == 1", "nope = 'a' AND age > 2", "col('no pe') IS NULL", "is_null(nope)"]
)
def test_unknown_column_is_named_with_the_store_columns(retriever, where):
    """Guards against pyarrow's ``No match for FieldRef.Name(nope) in ...`` reaching users."""
    with pytest.raises(QueryError) as exc_info:
        retriever.search(0, k=3, where=where)
    message = _one_line(exc_info)
    assert "unknown column 'no" in message
    assert "the store's columns: " in message and "diagnosis" in message and "age" in message


def test_unknown_column_in_an_expression_is_named_too(retriever):
    with pytest.raises(QueryError) as exc_info:
        retriever.search(0, k=3, where=pc.field("nope") == 1)
    assert "unknown column 'nope'" in _one_line(exc_info)


@pytest.mark.parametrize(
    ("where", "says"),
    [
        ("x in (1, 'x')", "one type"),
        ("benign in (True, 1)", "one type"),
        ("diagnosis in ('mel', 2.5)", "one type"),
        ("age == 'x'", "column 'age' holds numbers"),
        ("'x' < age", "column 'age' holds numbers"),
        ("diagnosis > 3", "column 'diagnosis' holds strings"),
        ("benign == 1", "column 'benign' holds booleans"),
        ("age in ('a', 'b')", "column 'age' holds numbers"),
        ("age", "not True/False"),
        ("diagnosis = age", "cannot compare"),
    ],
)
def test_wrong_and_mixed_types_are_one_clear_error(retriever, where, says):
    """Guards against ``ArrowInvalid`` tracebacks while building ``isin`` lists of mixed types
    and pyarrow's kernel messages for a column compared with a value of another type."""
    with pytest.raises(QueryError) as exc_info:
        retriever.search(0, k=3, where=where)
    assert says in _one_line(exc_info)


@pytest.mark.parametrize(
    "where",
    [
        "age > 99999999999999999999",
        "age in (1, 18446744073709551616)",
        "age < -18446744073709551616",
    ],
)
def test_integers_beyond_int64_in_where(retriever, where):
    """Guards against ``OverflowError: Python int too large to convert to C long``."""
    with pytest.raises(QueryError) as exc_info:
        retriever.search(0, k=3, where=where)
    _one_line(exc_info)


def test_integers_at_the_int64_limits_are_accepted(retriever):
    assert not retriever.search(0, k=3, where="age > 9223372036854775807")["style"]
    assert len(retriever.search(0, k=3, where="age > -9223372036854775808")["style"]) == 3


@pytest.mark.parametrize("exclude", [[2**70], [1, 2**63], [-(2**64)], np.array([2**63], np.uint64)])
def test_integers_beyond_int64_in_exclude(retriever, exclude):
    """Guards against ``np.asarray(exclude, np.int64)`` raising ``OverflowError``."""
    with pytest.raises(QueryError, match="exclude: row .* is out of range"):
        retriever.search(0, k=3, exclude=exclude)
    assert len(retriever.search(0, k=3, exclude=[1, np.int64(2)])["style"]) == 3


@pytest.mark.parametrize(
    "where", ["path == '/nonexistent/3.jpg'", "col('path') = 'x' OR age > 1", "is_null(path)"]
)
def test_hidden_columns_cannot_be_filtered_on(retriever, where):
    """Guards against ``where path == '...'`` answering for a column the server never returns
    (an oracle for the server's paths): refused, as ``columns=('path',)`` is."""
    assert retriever.search(0, k=3, where=where)  # the library alone may filter on it
    with pytest.raises(QueryError) as exc_info:
        retriever.search(0, k=3, where=where, hidden_columns={"path"})
    message = _one_line(exc_info)
    assert "column 'path' is not served" in message
    with pytest.raises(QueryError, match="column 'path' is not served"):
        retriever.search(0, k=3, where=pc.field("path") == "x", hidden_columns={"path"})
    with pytest.raises(QueryError, match="column 'path' is not served"):
        retriever.search(0, k=3, columns=("path",), hidden_columns={"path"})
    with pytest.raises(QueryError) as exc_info:
        retriever.search(0, k=3, where="nope == 1", hidden_columns={"path"})
    assert "path" not in _one_line(exc_info)  # not listed among the columns either


def test_server_refuses_filters_on_path(store):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermris.app.server import create_app

    client = TestClient(create_app(store, device="cpu"), base_url="http://127.0.0.1:8000")
    ok = client.post("/api/search", data={"row": 1, "k": 3, "where": "diagnosis = 'mel'"})
    assert ok.status_code == 200, ok.text
    for where in ("path == '/nonexistent/3.jpg'", "path IS NOT NULL"):
        refused = client.post("/api/search", data={"row": 1, "where": where})
        assert refused.status_code == 400, refused.text
        assert "column 'path' is not served" in refused.json()["detail"]
    big = client.post("/api/search", data={"row": 1, "where": "age > 99999999999999999999"})
    assert big.status_code == 400 and "64-bit" in big.json()["detail"]
    mixed = client.post("/api/search", data={"row": 1, "where": "x in (1, 'x')"})
    assert mixed.status_code == 400 and "one type" in mixed.json()["detail"]


def test_non_finite_metadata_is_json_compliant(retriever):
    """A metadata value ``inf`` or ``nan`` asked for as a column comes out as null, so the
    answer is strict JSON (``allow_nan=False``), in the library and the server alike."""
    result = retriever.search(0, measures=("style", "i1_sd"), k=N, columns=("value", "age"))
    values = [h.metadata["value"] for h in result["style"]]
    assert any(v == math.inf for v in values) and any(
        isinstance(v, float) and v != v for v in values
    )
    text = json.dumps(result.to_dict(), allow_nan=False)
    served = [h["metadata"]["value"] for h in json.loads(text)["results"]["style"]]
    assert None in served and 1.5 in served
    assert all(v is None or math.isfinite(v) for v in served)


def test_json_safe_covers_numpy_scalars():
    """Guards against NumPy floats (not ``float`` subclasses for float32) slipping through."""
    data = {
        "a": np.float32("inf"),
        "b": [np.float64("nan"), np.float16(2.0)],
        "c": np.int64(3),
        "d": np.bool_(True),
        "e": (float("-inf"), "x"),
    }
    safe = json_safe(data)
    assert json.loads(json.dumps(safe, allow_nan=False)) == {
        "a": None,
        "b": [None, 2.0],
        "c": 3,
        "d": True,
        "e": [None, "x"],
    }


def test_filters_are_evaluated_once_and_never_confused(retriever, monkeypatch):
    """A repeated filter is evaluated once (its rows are kept); filters that print alike but
    differ (``x == 1`` against ``x == 1.5``), the same text with other hidden columns, and
    an expression beside its string form are told apart; every answer equals a fresh
    evaluation."""
    import dermris.retriever.search as search_module

    calls = []
    real = search_module.rows_matching

    def counting(table, where, *, hidden=()):
        calls.append(where)
        return real(table, where, hidden=hidden)

    monkeypatch.setattr(search_module, "rows_matching", counting)
    fresh = Retriever.open(retriever.store.root, device="cpu")
    table = fresh.metadata()
    for where in ["age >= 30", "age >= 30", pc.field("x") == 1, pc.field("x") == 1.5]:
        got = fresh.search(0, measures="cosine", k=N, where=where)
        expected = set(np.flatnonzero(real(table, where))) - {0}
        assert {h.row for h in got["cosine"]} == expected
    assert len(calls) == 3  # the repeated string was evaluated once
    assert str(pc.field("x") == 1) == str(pc.field("x") == 1.0)  # why the key is not str()
    ones = fresh.search(0, measures="cosine", k=N, where=pc.field("x") == 1.0)
    assert {h.row for h in ones["cosine"]} == set(np.flatnonzero(real(table, "x == 1"))) - {0}
    with pytest.raises(QueryError, match="not served"):
        fresh.search(0, measures="cosine", where="age >= 30", hidden_columns={"age"})
