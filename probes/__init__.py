"""Numerics, condition-number, memory and time probes for any PyTorch training loop.

Unrelated to the PyPI package of the same name.
"""

from probes.records import COLUMNS, SCHEMA_VERSION
from probes.session import DEFAULT_EVERY, PROBES, NonFinite, ProbeSession, attach

__all__ = [
    "COLUMNS",
    "DEFAULT_EVERY",
    "PROBES",
    "SCHEMA_VERSION",
    "NonFinite",
    "ProbeSession",
    "attach",
]
