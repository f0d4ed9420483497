"""Thin alias: the published singd 0.0.5 module ``singd.structures.triltopleftdiag``.

Its class is ours, ``TrilTopLeftDiagonalMatrix``
of :mod:`singd.structures.triangular` (structure name
``triltopleftdiag``), under the import path the published package uses.
"""

from singd.structures.triangular import TrilTopLeftDiagonalMatrix

__all__ = ["TrilTopLeftDiagonalMatrix"]
