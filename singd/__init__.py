"""SINGD (structured inverse-free natural gradient) and its KFAC baseline.

A drop-in replacement for the PyPI package ``singd`` 0.0.5: ``from singd import SINGD``,
or the published paths (``from singd.optim.optimizer import SINGD``, the structure
modules under ``singd.structures``), which are thin aliases of the same classes.
"""

from singd.optim.kfac import KFAC
from singd.optim.singd import SINGD

__all__ = ["KFAC", "SINGD"]
__version__ = "0.1.0"
