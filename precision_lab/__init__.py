"""Stress suites, reports and CI gates for SINGD and KFAC in low precision."""

__version__ = "0.1.0"
