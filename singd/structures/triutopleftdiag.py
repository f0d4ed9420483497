"""Thin alias: the published singd 0.0.5 module ``singd.structures.triutopleftdiag``.

Its class is ours, ``TriuTopLeftDiagonalMatrix``
of :mod:`singd.structures.triangular` (structure name
``triutopleftdiag``), under the import path the published package uses.
"""

from singd.structures.triangular import TriuTopLeftDiagonalMatrix

__all__ = ["TriuTopLeftDiagonalMatrix"]
