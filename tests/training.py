"""Small pieces of a training loop that many tests share."""

from __future__ import annotations

import torch


def finish_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """``optimizer.step()``, or through ``scaler`` (its step, then its update) where given."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
