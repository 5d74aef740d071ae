"""Typed access to the arrays and groups inside ``arrays.zarr``.

zarr types ``group[name]`` as "an array or a group"; these helpers name the kind the store keeps
at ``name``. They check nothing (the reader validates what it opens), so an entry of the wrong
kind fails where it is used, as it would through ``group[name]``.
"""

from __future__ import annotations

from typing import Any, cast

import zarr

__all__ = ["array", "group"]


def array(parent: zarr.Group, name: str) -> zarr.Array[Any]:
    """``parent[name]``, an array."""
    return cast("zarr.Array[Any]", parent[name])


def group(parent: zarr.Group, name: str) -> zarr.Group:
    """``parent[name]``, a group."""
    return cast("zarr.Group", parent[name])
