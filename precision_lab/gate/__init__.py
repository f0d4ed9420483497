"""CI gates: baselines of a run directory's figures (`baseline`) and the checks that judge
a run directory against one (`checks`). Reads run directories through `precision_lab.run`.
"""

from precision_lab.gate.checks import GateResult, Tolerances, gate

__all__ = ["GateResult", "Tolerances", "gate"]
