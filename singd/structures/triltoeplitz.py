"""Thin alias: the published singd 0.0.5 module ``singd.structures.triltoeplitz``.

Its class is ours, ``TrilToeplitzMatrix``
of :mod:`singd.structures.toeplitz` (structure name
``triltoeplitz``), under the import path the published package uses.
"""

from singd.structures.toeplitz import TrilToeplitzMatrix

__all__ = ["TrilToeplitzMatrix"]
