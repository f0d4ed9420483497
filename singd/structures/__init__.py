"""Structured matrices for SINGD's Kronecker factors; see :mod:`singd.structures.registry`
for the names and :mod:`singd.structures.base` for the operations and projection rules."""

from singd.structures.base import StructuredMatrix
from singd.structures.registry import STRUCTURE_FORMS, STRUCTURE_NAMES, get_structure

__all__ = ["STRUCTURE_FORMS", "STRUCTURE_NAMES", "StructuredMatrix", "get_structure"]
