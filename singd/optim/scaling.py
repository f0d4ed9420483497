"""Gradient scaling (torch.amp.GradScaler) as a Kronecker optimizer sees it.

The scaler multiplies the loss by a scale ``s_t`` that is only known at ``step()``.
During backward the output gradients are divided by ``sqrt(s_{t-1})`` (the previous
step's scale; ``init_grad_scale`` before the first step), so an output-side curvature
term carries ``s_t^2 / s_{t-1}``; the preconditioner update receives
``grad_unscaling = s_{t-1} / s_t^2`` to remove the rest. Gradients are divided by
``s_t`` before preconditioning. A step whose gradients hold infs is skipped and its
curvature terms dropped; so is a step whose scale is not a positive finite number.

Scales are Python floats, or 0-d float64 tensors where a GradScaler hands its scale over:
those stay on the device, since reading one would wait for the step's kernels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Scale = float | Tensor
"""A gradient scale or un-scaling factor: a Python number, or a 0-d tensor on the device."""


def not_one(value: Scale) -> bool:
    """Whether multiplying by ``value`` may change something (a tensor always may: it is
    not read, so that nothing waits for the device)."""
    return isinstance(value, Tensor) or value != 1.0


def unscale_output_rows(g: Tensor, prev_scale: Scale) -> Tensor:
    """The output-gradient rows ``g`` divided by ``sqrt(s_{t-1})`` (a new tensor unless
    the scale is the number 1)."""
    if isinstance(prev_scale, Tensor):
        return g / prev_scale.sqrt()
    if prev_scale != 1.0:
        return g / math.sqrt(prev_scale)
    return g


def skip_verdict(scale: Scale, found_inf: Tensor | None) -> tuple[bool, bool, float | None]:
    """``(infs, bad_scale, read_scale)``: whether the GradScaler found infs, whether the
    step's scale is not a positive finite number (a scale that collapsed to 0 makes
    every gradient 0 and every un-scaling a division by 0: the step is skipped, as
    torch's optimizers skip it, and counted), and a usable tensor scale as read on the
    host (None for a Python scale or a bad one), for the first-step warning.

    With a GradScaler this is the step's one host read (torch's optimizers read
    ``found_inf`` once too); without one, none: the scale is then a Python number.
    """
    if not isinstance(scale, Tensor):
        bad = not 0.0 < scale < math.inf
        if found_inf is None:
            return False, bad, None
        return bool(found_inf), bad, None
    parts = [(~torch.isfinite(scale) | (scale <= 0)).to(scale.dtype), scale]
    if found_inf is not None:
        parts.append(torch.as_tensor(found_inf).to(scale))
    values = torch.stack([p.reshape(()) for p in parts]).tolist()
    bad = bool(values[0])
    return len(values) > 2 and bool(values[2]), bad, None if bad else values[1]
