"""Numerics, condition-number, memory and time probes for any PyTorch training loop.

Unrelated to the PyPI package of the same name.
"""

from probes.records import COLUMNS, SCHEMA_VERSION

__all__ = ["COLUMNS", "SCHEMA_VERSION"]
