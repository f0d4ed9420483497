"""Thin alias: the published singd 0.0.5 module ``singd.optim.optimizer``.

Its ``SINGD`` is ours, :class:`singd.optim.singd.SINGD`, under the import path the
published package's README and examples use.
"""

from singd.optim.singd import SINGD

__all__ = ["SINGD"]
