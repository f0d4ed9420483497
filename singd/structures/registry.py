"""Structure names as users write them, parsed into structure classes.

Names (case-insensitive):

- ``dense``, ``diagonal``;
- ``block{N}diagonal`` for any N >= 1 (``block30diagonal``): dense N x N diagonal blocks;
- ``hierarchical{K1}_{K2}`` for any K1, K2 >= 1 (``hierarchical15_15``);
- ``triltoeplitz``, ``triutoeplitz``: lower / upper triangular Toeplitz;
- the four recursive triangular structures of the reference, named after where their
  diagonal part sits: ``triltopleftdiag`` ``[[diag, 0], [row, c]]``,
  ``trilbottomrightdiag`` ``[[a, 0], [column, diag]]``, ``triutopleftdiag``
  ``[[diag, column], [0, c]]``, ``triubottomrightdiag`` ``[[a, row], [0, diag]]``.
"""

from __future__ import annotations

import re
from functools import cache

from singd.structures.base import StructuredMatrix
from singd.structures.blockdiagonal import BlockDiagonalMatrix
from singd.structures.dense import DenseMatrix
from singd.structures.diagonal import DiagonalMatrix
from singd.structures.hierarchical import HierarchicalMatrix
from singd.structures.toeplitz import TrilToeplitzMatrix, TriuToeplitzMatrix
from singd.structures.triangular import (
    TrilBottomRightDiagonalMatrix,
    TrilTopLeftDiagonalMatrix,
    TriuBottomRightDiagonalMatrix,
    TriuTopLeftDiagonalMatrix,
)

STRUCTURE_FORMS: tuple[str, ...] = (
    "dense",
    "diagonal",
    "block{N}diagonal",
    "hierarchical{K1}_{K2}",
    "triltoeplitz",
    "triutoeplitz",
    "triltopleftdiag",
    "trilbottomrightdiag",
    "triutopleftdiag",
    "triubottomrightdiag",
)
"""The name forms ``get_structure`` accepts, for error messages and CLI help."""

STRUCTURE_NAMES: tuple[str, ...] = tuple(
    form.replace("{N}", "30").replace("{K1}_{K2}", "15_15") for form in STRUCTURE_FORMS
)
"""One canonical instance of every structure (the reference's sizes), for tests and help."""

_FIXED: dict[str, type[StructuredMatrix]] = {
    cls.name: cls
    for cls in (
        DenseMatrix,
        DiagonalMatrix,
        TrilToeplitzMatrix,
        TriuToeplitzMatrix,
        TrilTopLeftDiagonalMatrix,
        TrilBottomRightDiagonalMatrix,
        TriuTopLeftDiagonalMatrix,
        TriuBottomRightDiagonalMatrix,
    )
}

_BLOCK = re.compile(r"block(\d+)diagonal")
_HIERARCHICAL = re.compile(r"hierarchical(\d+)_(\d+)")


def get_structure(name: str) -> type[StructuredMatrix]:
    """The structure class for a name such as ``dense`` or ``block30diagonal``.

    Args:
        name: A structure name, one of :data:`STRUCTURE_FORMS` (case-insensitive).

    Returns:
        The class; the same name always gives the same class object.

    Raises:
        ValueError: If the name matches no form, or a size in it is zero.
    """
    key = name.strip().lower() if isinstance(name, str) else ""
    if key in _FIXED:
        return _FIXED[key]
    if match := _BLOCK.fullmatch(key):
        return _block_diagonal(int(match.group(1)))
    if match := _HIERARCHICAL.fullmatch(key):
        return _hierarchical(int(match.group(1)), int(match.group(2)))
    raise ValueError(
        f"Unknown structure {name!r}; valid structures are {', '.join(STRUCTURE_FORMS)} "
        "(with positive integer sizes N, K1, K2)."
    )


def _positive(size: int, name: str) -> int:
    if size < 1:
        raise ValueError(f"Structure size in {name!r} must be a positive integer, got {size}.")
    return size


@cache
def _block_diagonal(block_size: int) -> type[BlockDiagonalMatrix]:
    name = f"block{_positive(block_size, f'block{block_size}diagonal')}diagonal"
    return type(
        f"Block{block_size}DiagonalMatrix",
        (BlockDiagonalMatrix,),
        {
            "name": name,
            "block_size": block_size,
            "BLOCK_DIM": block_size,  # the published package's name for N
            "__module__": BlockDiagonalMatrix.__module__,
        },
    )


@cache
def _hierarchical(k1: int, k2: int) -> type[HierarchicalMatrix]:
    name = f"hierarchical{k1}_{k2}"
    _positive(k1, name)
    _positive(k2, name)
    return type(
        f"Hierarchical{k1}_{k2}Matrix",
        (HierarchicalMatrix,),
        {
            "name": name,
            "k1": k1,
            "k2": k2,
            "MAX_K1": k1,  # the published package's names for K1, K2
            "MAX_K2": k2,
            "__module__": HierarchicalMatrix.__module__,
        },
    )
