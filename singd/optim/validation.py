"""Checks of the hyperparameters a user passes, each failure explained in one sentence."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

from singd.optim.layers import KFAC_APPROXES, LOSS_AVERAGES


def check_number(
    value: Any, name: str, *, low: float = 0.0, high: float = math.inf, open_low=False
) -> None:
    """Raise ValueError unless ``value`` is a real number in ``[low, high)`` (``(low, high)``)."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value < high
    if not ok:
        bounds = f"{'>' if open_low else '>='} {low:g}"
        bounds += f" and < {high:g}" if math.isfinite(high) else ""
        raise ValueError(f"{name} must be a number {bounds}, got {value!r}.")


def group_location(index: int, groups: int) -> str:
    """Where a bad value sits, for the message: its parameter group where there are several."""
    return f" (parameter group {index})" if groups > 1 else ""


def check_common_group(group: dict[str, Any], where: str) -> None:
    """Check the hyperparameters every Kronecker optimizer has: ``lr``, ``momentum``,
    ``weight_decay``, ``T``, ``loss_average`` and ``kfac_approx``.

    Raises:
        ValueError: One sentence naming the bad value and what would be right.
    """
    check_number(group["lr"], f"lr{where}")
    check_number(group["momentum"], f"momentum{where}", high=1.0)
    check_number(group["weight_decay"], f"weight_decay{where}")
    T = group["T"]
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"T{where} must be a positive integer, got {T!r}.")
    if group["loss_average"] not in LOSS_AVERAGES:
        raise ValueError(
            f"loss_average{where} must be None, 'batch' or 'batch+sequence', "
            f"got {group['loss_average']!r}."
        )
    if group["kfac_approx"] not in KFAC_APPROXES:
        raise ValueError(
            f"kfac_approx{where} must be 'expand' or 'reduce', got {group['kfac_approx']!r}."
        )
