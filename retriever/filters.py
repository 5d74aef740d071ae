"""Metadata filters: ``where=`` as a pyarrow compute expression, or as a small text language.

The text form (the command line's ``--where``) is parsed with Python's own grammar and turned
into a :class:`pyarrow.compute.Expression`; nothing is evaluated as Python. It accepts::

    diagnosis == 'melanoma'
    age_approx >= 50 and sex == 'female'
    diagnosis in ('melanoma', 'nevus') or not benign
    col('anatom site') != 'torso'          # a column name that is not an identifier
    is_null(diagnosis)   /   not is_null(diagnosis)

Comparisons: ``== != < <= > >=`` (chains such as ``30 <= age < 60`` too), ``in`` / ``not in``
a tuple or list of literals; ``and``, ``or``, ``not``; literals: strings, numbers, True,
False, None.
"""

from __future__ import annotations

import ast
import operator
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


def _literal(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Constant) and (
        node.value is None or isinstance(node.value, (str, int, float, bool))
    ):
        return node.value
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
        and isinstance(node.operand.value, (int, float))
        and not isinstance(node.operand.value, bool)
    ):
        return -node.operand.value
    raise QueryError(
        f"where: expected a literal (string, number, True, False, None) in {text!r}, "
        f"got {ast.unparse(node)!r}"
    )


def _operand(node: ast.AST, text: str) -> Any:
    """A field reference or a literal."""
    if isinstance(node, ast.Name):
        return pc.field(node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "col":
        if (
            len(node.args) != 1
            or node.keywords
            or not isinstance(node.args[0], ast.Constant)
            or not isinstance(node.args[0].value, str)
        ):
            raise QueryError(f"where: col() takes one quoted column name in {text!r}")
        return pc.field(node.args[0].value)
    return _literal(node, text)


def _convert(node: ast.AST, text: str) -> pc.Expression:
    if isinstance(node, ast.BoolOp):
        parts = [_convert(v, text) for v in node.values]
        out = parts[0]
        for part in parts[1:]:
            out = (out & part) if isinstance(node.op, ast.And) else (out | part)
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ~_convert(node.operand, text)
    if isinstance(node, ast.Compare):
        left = _operand(node.left, text)
        out = None
        for op, right_node in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)):
                if not isinstance(right_node, (ast.Tuple, ast.List, ast.Set)):
                    raise QueryError(f"where: 'in' needs a tuple or list of literals in {text!r}")
                if not isinstance(left, pc.Expression):
                    raise QueryError(f"where: 'in' needs a column on its left in {text!r}")
                values = [_literal(e, text) for e in right_node.elts]
                term = left.isin(values)
                term = ~term if isinstance(op, ast.NotIn) else term
                right = None
            elif type(op) in _COMPARE:
                right = _operand(right_node, text)
                if not isinstance(left, pc.Expression) and not isinstance(right, pc.Expression):
                    raise QueryError(f"where: a comparison needs a column in {text!r}")
                if left is None or right is None:
                    raise QueryError(f"where: compare with None using is_null(column) in {text!r}")
                term = _COMPARE[type(op)](
                    left if isinstance(left, pc.Expression) else pc.scalar(left),
                    right if isinstance(right, pc.Expression) else pc.scalar(right),
                )
            else:
                raise QueryError(
                    f"where: unsupported comparison {ast.unparse(node)!r} "
                    "(use == != < <= > >= in, not in)"
                )
            out = term if out is None else out & term
            left = right if right is not None else left
        return out
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "is_null":
        if len(node.args) != 1 or node.keywords:
            raise QueryError(f"where: is_null() takes one column in {text!r}")
        target = _operand(node.args[0], text)
        if not isinstance(target, pc.Expression):
            raise QueryError(f"where: is_null() takes a column in {text!r}")
        return target.is_null()
    if isinstance(node, (ast.Name, ast.Call)):
        target = _operand(node, text)
        return target == pc.scalar(True)
    raise QueryError(f"where: unsupported expression {ast.unparse(node)!r} in {text!r}")


def parse_where(text: str) -> pc.Expression:
    """Turn a filter written as text into a pyarrow compute expression.

    Raises
    ------
    QueryError
        With a one-line reason, for anything outside the small language above.
    """
    if not isinstance(text, str) or not text.strip():
        raise QueryError("where: empty filter")
    if len(text) > _MAX_LENGTH:
        raise QueryError(f"where: filter longer than {_MAX_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise QueryError(f"where: cannot parse {text!r}: {getattr(exc, 'msg', exc)}") from None
    try:
        return _convert(tree.body, text)
    except RecursionError:
        raise QueryError(f"where: filter nested too deeply: {text[:60]!r}") from None


def rows_matching(table: pa.Table, where: "pc.Expression | str") -> np.ndarray:
    """Boolean ``(N,)``: the rows of ``table`` (in row order) for which ``where`` is true.

    Null results count as false (SQL's WHERE).

    Raises
    ------
    QueryError
        Unknown columns, or values of the wrong type for a column.
    """
    expression = parse_where(where) if isinstance(where, str) else where
    if not isinstance(expression, pc.Expression):
        raise QueryError(
            f"where must be a pyarrow compute expression or a string, not {type(where).__name__}"
        )
    marker = "__dermris_position__"
    indexed = table.append_column(marker, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    try:
        positions = ds.dataset(indexed).to_table(filter=expression, columns=[marker]).column(marker)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, KeyError) as exc:
        message = str(exc).splitlines()[0]
        raise QueryError(f"where: {message} (columns: {', '.join(table.column_names)})") from None
    mask = np.zeros(table.num_rows, bool)
    mask[positions.to_numpy()] = True
    return mask
