"""Metadata filters: ``where=`` as a pyarrow compute expression, or as a small text language.

The text form (the command line's ``--where``, the API's ``where``) is parsed with Python's
own grammar and turned into a :class:`pyarrow.compute.Expression`; nothing is evaluated as
Python. It accepts Python forms and their SQL spellings (``docs/filters.md`` has the full
grammar)::

    diagnosis == 'melanoma'                  diagnosis = 'melanoma'
    age_approx >= 50 and sex == 'female'     age_approx >= 50 AND sex = 'female'
    diagnosis in ('melanoma', 'nevus') or not benign
    col('anatom site') != 'torso'            # a column name that is not an identifier
    is_null(diagnosis)   /   diagnosis is None   /   diagnosis IS NOT NULL

Comparisons: ``== = != <> < <= > >=`` (chains such as ``30 <= age < 60`` too), ``in`` /
``not in`` a tuple or list of literals; ``and``, ``or``, ``not`` (any case); literals:
strings, numbers (64-bit integers, floats), True, False, None (also ``TRUE``, ``FALSE``,
``NULL``). When the table is known, every column is checked to exist and every literal to fit
its column's type before anything is evaluated, so mistakes give one clear line.
"""

from __future__ import annotations

import ast
import io
import operator
import re
import tokenize
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from dermris.core.errors import QueryError

__all__ = ["parse_where", "rows_matching"]

_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_MAX_LENGTH = 4000
_INT64 = (-(2**63), 2**63 - 1)
# SQL spellings, matched case-insensitively outside string literals
_SQL_WORDS = {
    "and": "and",
    "or": "or",
    "not": "not",
    "in": "in",
    "is": "is",
    "null": "None",
    "true": "True",
    "false": "False",
}


@dataclass(frozen=True)
class _Col:
    """A column reference met while parsing."""

    name: str


class _Context:
    """What a parse checks against: the table's schema (optional) and hidden columns."""

    def __init__(self, text: str, schema: pa.Schema | None, hidden: Collection[str]) -> None:
        self.text = text
        self.schema = schema
        self.hidden = frozenset(hidden)

    def column(self, name: str) -> _Col:
        if name in self.hidden:
            raise QueryError(f"where: column {name!r} is not served, so it cannot be filtered on")
        if self.schema is not None and self.schema.get_field_index(name) < 0:
            raise QueryError(
                f"where: unknown column {name!r}; {_columns(self.schema, self.hidden)}"
            )
        return _Col(name)

    def kind(self, col: _Col) -> str | None:
        """``"string"``, ``"number"``, ``"boolean"``, or None (unknown or another type)."""
        if self.schema is None:
            return None
        t = self.schema.field(col.name).type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return "string"
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
            return "number"
        if pa.types.is_boolean(t):
            return "boolean"
        return None

    def check_fits(self, col: _Col, value: Any) -> None:
        """A literal compared with ``col`` must be of the column's kind."""
        kind = self.kind(col)
        if kind is None or value is None or _kind_of(value) == kind:
            return
        t = self.schema.field(col.name).type if self.schema is not None else "?"
        raise QueryError(
            f"where: column {col.name!r} holds {kind}s ({t}), so it cannot be compared with "
            f"the {_kind_of(value)} {value!r} in {self.text!r}"
        )


def _columns(schema: pa.Schema, hidden: Collection[str]) -> str:
    names = [n for n in schema.names if n not in hidden and not n.startswith("__dermris")]
    return f"the store's columns: {', '.join(names)}"


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "string"


def _literal(node: ast.AST, ctx: _Context) -> Any:
    value: Any
    if isinstance(node, ast.Constant) and (
        node.value is None or isinstance(node.value, (str, int, float, bool))
    ):
        value = node.value
    elif (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
        and isinstance(node.operand.value, (int, float))
        and not isinstance(node.operand.value, bool)
    ):
        value = -node.operand.value
    else:
        raise QueryError(
            f"where: expected a literal (string, number, True, False, None) in {ctx.text!r}, "
            f"got {ast.unparse(node)!r}"
        )
    if isinstance(value, int) and not isinstance(value, bool):
        if not _INT64[0] <= value <= _INT64[1]:
            raise QueryError(
                f"where: the integer {value} is outside the 64-bit range in {ctx.text!r}"
            )
    return value


def _operand(node: ast.AST, ctx: _Context) -> Any:
    """A column reference (:class:`_Col`) or a literal."""
    if isinstance(node, ast.Name):
        return ctx.column(node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "col":
        if (
            len(node.args) != 1
            or node.keywords
            or not isinstance(node.args[0], ast.Constant)
            or not isinstance(node.args[0].value, str)
        ):
            raise QueryError(f"where: col() takes one quoted column name in {ctx.text!r}")
        return ctx.column(node.args[0].value)
    return _literal(node, ctx)


def _expr(value: Any) -> pc.Expression:
    return pc.field(value.name) if isinstance(value, _Col) else pc.scalar(value)


def _membership(left: Any, right_node: ast.AST, negate: bool, ctx: _Context) -> pc.Expression:
    if isinstance(right_node, (ast.Tuple, ast.List, ast.Set)):
        elements = list(right_node.elts)
    elif isinstance(right_node, (ast.Constant, ast.UnaryOp)):  # SQL's IN ('mel'): one value
        elements = [right_node]
    else:
        raise QueryError(f"where: 'in' needs a tuple or list of literals in {ctx.text!r}")
    if not isinstance(left, _Col):
        raise QueryError(f"where: 'in' needs a column on its left in {ctx.text!r}")
    values = [_literal(e, ctx) for e in elements]
    kinds = sorted({_kind_of(v) for v in values if v is not None})
    if len(kinds) > 1:
        raise QueryError(
            f"where: the values of an 'in' list must all be of one type (found "
            f"{' and '.join(kinds)} values) in {ctx.text!r}"
        )
    for value in values:
        ctx.check_fits(left, value)
    try:
        term = pc.field(left.name).isin(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
        raise QueryError(f"where: bad 'in' list in {ctx.text!r} ({exc})") from None
    return ~term if negate else term


def _null_test(left: Any, right: Any, negate: bool, ctx: _Context) -> pc.Expression:
    col, other = (left, right) if isinstance(left, _Col) else (right, left)
    if not isinstance(col, _Col) or other is not None:
        raise QueryError(f"where: 'is' only tests a column against None (NULL) in {ctx.text!r}")
    term = pc.field(col.name).is_null()
    return ~term if negate else term


def _compare(op: ast.cmpop, left: Any, right: Any, ctx: _Context) -> pc.Expression:
    if not isinstance(left, _Col) and not isinstance(right, _Col):
        raise QueryError(f"where: a comparison needs a column in {ctx.text!r}")
    if left is None or right is None:
        raise QueryError(
            f"where: compare with None using is_null(column) or 'column is None' in {ctx.text!r}"
        )
    if isinstance(left, _Col) and not isinstance(right, _Col):
        ctx.check_fits(left, right)
    elif isinstance(right, _Col) and not isinstance(left, _Col):
        ctx.check_fits(right, left)
    return _COMPARE[type(op)](_expr(left), _expr(right))


def _convert(node: ast.AST, ctx: _Context) -> pc.Expression:
    if isinstance(node, ast.BoolOp):
        parts = [_convert(v, ctx) for v in node.values]
        out = parts[0]
        for part in parts[1:]:
            out = (out & part) if isinstance(node.op, ast.And) else (out | part)
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ~_convert(node.operand, ctx)
    if isinstance(node, ast.Compare):
        left = _operand(node.left, ctx)
        out = None
        for op, right_node in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)):
                term = _membership(left, right_node, isinstance(op, ast.NotIn), ctx)
                right = left
            elif isinstance(op, (ast.Is, ast.IsNot)):
                right = _operand(right_node, ctx)
                term = _null_test(left, right, isinstance(op, ast.IsNot), ctx)
            elif type(op) in _COMPARE:
                right = _operand(right_node, ctx)
                term = _compare(op, left, right, ctx)
            else:
                raise QueryError(
                    f"where: unsupported comparison {ast.unparse(node)!r} "
                    "(use == != < <= > >= in, not in)"
                )
            out = term if out is None else out & term
            left = right
        assert out is not None  # a Compare has at least one operator
        return out
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "is_null":
        if len(node.args) != 1 or node.keywords:
            raise QueryError(f"where: is_null() takes one column in {ctx.text!r}")
        target = _operand(node.args[0], ctx)
        if not isinstance(target, _Col):
            raise QueryError(f"where: is_null() takes a column in {ctx.text!r}")
        return pc.field(target.name).is_null()
    if isinstance(node, (ast.Name, ast.Call)):
        target = _operand(node, ctx)
        if isinstance(target, _Col):
            kind = ctx.kind(target)
            if kind not in (None, "boolean"):
                raise QueryError(
                    f"where: column {target.name!r} holds {kind}s, not True/False: compare it "
                    f"with a value in {ctx.text!r}"
                )
        return _expr(target) == pc.scalar(True)
    raise QueryError(f"where: unsupported expression {ast.unparse(node)!r} in {ctx.text!r}")


def _python_form(text: str) -> str:
    """The SQL spellings rewritten to Python's, outside string literals: ``=`` -> ``==``,
    ``<>`` -> ``!=``, ``AND``/``OR``/``NOT``/``IN``/``IS`` (any case) -> lower case,
    ``NULL``/``TRUE``/``FALSE`` -> ``None``/``True``/``False``.

    Two string literals side by side are refused: Python would join them (``'it''s'`` reads
    ``its``), which is never what SQL's doubled quote means.
    """
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return text  # ast.parse reports the problem
    edits: list[tuple[int, int, str]] = []
    previous = None
    for tok in tokens:
        begin = starts[tok.start[0] - 1] + tok.start[1]
        end = starts[tok.end[0] - 1] + tok.end[1]
        if tok.type == tokenize.STRING and previous is not None:
            if previous.type == tokenize.STRING:
                raise QueryError(
                    f"where: two strings side by side in {text!r}; to put a quote in a "
                    "string, write \"it's\" or 'it\\'s'"
                )
        if tok.type == tokenize.OP and tok.string == "=":
            edits.append((begin, end, "=="))
        elif tok.type == tokenize.OP and tok.string == ">" and previous is not None:
            if previous.string == "<" and previous.end == tok.start:
                edits.append((begin - 1, end, "!="))
        elif tok.type == tokenize.NAME and tok.string.lower() in _SQL_WORDS:
            edits.append((begin, end, _SQL_WORDS[tok.string.lower()]))
        if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT):
            previous = tok
    out = text
    for begin, end, replacement in sorted(edits, reverse=True):
        out = out[:begin] + replacement + out[end:]
    return out


def parse_where(
    text: str, *, schema: pa.Schema | None = None, hidden: Collection[str] = ()
) -> pc.Expression:
    """Turn a filter written as text into a pyarrow compute expression.

    Parameters
    ----------
    text : str
        The filter (Python or SQL spellings, see the module's docstring).
    schema : pyarrow.Schema, optional
        The table it will filter: columns are checked to exist and literals to fit their
        column's type, so that mistakes are one clear line rather than pyarrow's messages.
    hidden : collection of str
        Columns that may not be filtered on (the server's ``path``).

    Raises
    ------
    QueryError
        With a one-line reason, for anything outside the small language above.
    """
    if not isinstance(text, str) or not text.strip():
        raise QueryError("where: empty filter")
    if len(text) > _MAX_LENGTH:
        raise QueryError(f"where: filter longer than {_MAX_LENGTH} characters")
    ctx = _Context(text, schema, hidden)
    python = _python_form(text.strip())
    try:
        tree = ast.parse(python, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise QueryError(f"where: cannot parse {text!r}: {getattr(exc, 'msg', exc)}") from None
    try:
        return _convert(tree.body, ctx)
    except RecursionError:
        raise QueryError(f"where: filter nested too deeply: {text[:60]!r}") from None


_FIELD_REF = re.compile(r"No match for FieldRef\.Name\((.*?)\) in")
_NO_KERNEL = re.compile(r"Function '(\w+)' has no kernel matching input types \((.*)\)")


def _arrow_message(exc: Exception, schema: pa.Schema, hidden: Collection[str]) -> str:
    """pyarrow's error as one line in the filter's own terms."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    missing = _FIELD_REF.search(message)
    if missing:
        name = missing.group(1)
        if name in hidden:
            return f"where: column {name!r} is not served, so it cannot be filtered on"
        return f"where: unknown column {name!r}; {_columns(schema, hidden)}"
    kernel = _NO_KERNEL.search(message)
    if kernel:
        return f"where: {kernel.group(1)} cannot compare values of types {kernel.group(2)}"
    return f"where: {message} ({_columns(schema, hidden)})"


def rows_matching(
    table: pa.Table, where: "pc.Expression | str", *, hidden: Collection[str] = ()
) -> np.ndarray:
    """Boolean ``(N,)``: the rows of ``table`` (in row order) for which ``where`` is true.

    Null results count as false (SQL's WHERE).

    Parameters
    ----------
    table : pyarrow.Table
        The metadata.
    where : pyarrow.compute.Expression or str
        The filter.
    hidden : collection of str
        Columns the filter may not use (refused with a clear message).

    Raises
    ------
    QueryError
        Unknown or hidden columns, or values of the wrong type for a column.
    """
    hidden = frozenset(hidden)
    if isinstance(where, str):
        expression = parse_where(where, schema=table.schema, hidden=hidden)
    elif isinstance(where, pc.Expression):
        expression = where
    else:
        raise QueryError(
            f"where must be a pyarrow compute expression or a string, not {type(where).__name__}"
        )
    visible = table.drop_columns([c for c in table.column_names if c in hidden])
    marker = "__dermris_position__"
    indexed = visible.append_column(marker, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    try:
        positions = ds.dataset(indexed).to_table(filter=expression, columns=[marker]).column(marker)
    except (
        pa.ArrowInvalid,
        pa.ArrowNotImplementedError,
        pa.ArrowTypeError,
        KeyError,
        OverflowError,
    ) as exc:
        raise QueryError(_arrow_message(exc, table.schema, hidden)) from None
    mask = np.zeros(table.num_rows, bool)
    mask[positions.to_numpy()] = True
    return mask
