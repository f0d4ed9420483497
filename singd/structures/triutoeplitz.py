"""Thin alias: the published singd 0.0.5 module ``singd.structures.triutoeplitz``.

Its class is ours, ``TriuToeplitzMatrix``
of :mod:`singd.structures.toeplitz` (structure name
``triutoeplitz``), under the import path the published package uses.
"""

from singd.structures.toeplitz import TriuToeplitzMatrix

__all__ = ["TriuToeplitzMatrix"]
