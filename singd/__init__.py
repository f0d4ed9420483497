"""SINGD (structured inverse-free natural gradient) and its KFAC baseline.

A drop-in replacement for the PyPI package ``singd`` 0.0.5: ``from singd import SINGD``.
"""

from singd.optim.singd import SINGD

# The KFAC engineer adds: from singd.optim.kfac import KFAC

__all__ = ["SINGD"]
__version__ = "0.1.0"
