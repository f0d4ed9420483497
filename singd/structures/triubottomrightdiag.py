"""Thin alias: the published singd 0.0.5 module ``singd.structures.triubottomrightdiag``.

Its class is ours, ``TriuBottomRightDiagonalMatrix``
of :mod:`singd.structures.triangular` (structure name
``triubottomrightdiag``), under the import path the published package uses.
"""

from singd.structures.triangular import TriuBottomRightDiagonalMatrix

__all__ = ["TriuBottomRightDiagonalMatrix"]
