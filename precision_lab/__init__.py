"""Stress suites, reports and CI gates for SINGD and KFAC in low precision.

Importing the package loads the run model (`load_run`) and the workload interface
(`Workload`, `chance_accuracy`) only; the report (plotly), the gate and the command line
load when used (docs/ARCHITECTURE.md).
"""

__version__ = "0.1.0"

# After __version__: the modules below may read it while the package is being imported.
from precision_lab.run.directory import load_run  # noqa: E402
from precision_lab.workloads.workload import Workload, chance_accuracy  # noqa: E402

__all__ = ["Workload", "__version__", "chance_accuracy", "load_run"]
