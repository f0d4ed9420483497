"""Thin alias: the published singd 0.0.5 module ``singd.structures.trilbottomrightdiag``.

Its class is ours, ``TrilBottomRightDiagonalMatrix``
of :mod:`singd.structures.triangular` (structure name
``trilbottomrightdiag``), under the import path the published package uses.
"""

from singd.structures.triangular import TrilBottomRightDiagonalMatrix

__all__ = ["TrilBottomRightDiagonalMatrix"]
