"""Stress suites, reports and CI gates for SINGD and KFAC in low precision."""

__version__ = "0.1.0"

from precision_lab.run.directory import load_run  # noqa: E402  (rundir reads __version__'s package)

__all__ = ["__version__", "load_run"]
