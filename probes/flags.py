"""The per-step finiteness check: one fused reduction per tensor, one sync per step.

Every watched tensor contributes its infinity norm ``amax = max |x|`` (a single
reduction, no temporary as large as the tensor): ``amax`` is NaN iff the tensor holds a
NaN (NaN propagates through ``max``), ``+inf`` iff it holds an infinity and no NaN, and
otherwise it is the largest magnitude, which also tells overflow risk and cast overflow
(`probes.limits`). The reductions stay on the device, in execution order, labelled with
``(module, tensor, phase)``; `StepFlags.resolve` brings them to the host in one transfer
per dtype, so the first non-finite tensor of a step is known exactly, whatever the
cadence of the expensive probes. Limitation: a tensor holding both NaN and infinities
counts as NaN only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from probes.limits import limits

Label = tuple[str, str, str]
"""``(module, tensor, phase)`` of a watched tensor."""


@dataclass(frozen=True)
class Flag:
    """One watched tensor's reading in a step.

    Attributes:
        label: ``(module, tensor, phase)``.
        amax: ``max |x|`` (NaN if the tensor holds a NaN).
        overflow: A finite ``amax`` beyond half the tensor's dtype max, or, for a
            tensor wider than the run's dtype, at or beyond its cast-overflow threshold.
    """

    label: Label
    amax: float
    overflow: bool

    @property
    def nan(self) -> bool:
        return math.isnan(self.amax)

    @property
    def inf(self) -> bool:
        return math.isinf(self.amax)


class StepFlags:
    """Device-side ``amax`` readings of one step, resolved to `Flag` s once per step.

    Args:
        run_dtype: The run's dtype; tensors wider than it are also checked for values
            that would overflow when cast to it.
    """

    def __init__(self, run_dtype: torch.dtype) -> None:
        self.run_dtype = run_dtype
        self._labels: list[Label] = []
        self._thresholds: list[float] = []
        self._pending: list[Tensor] = []
        self.resolved: list[Flag] = []

    def __len__(self) -> int:
        return len(self.resolved) + len(self._pending)

    def _threshold(self, dtype: torch.dtype) -> float:
        own = limits(dtype).overflow_risk
        if limits(dtype).max > limits(self.run_dtype).max:
            return min(own, limits(self.run_dtype).cast_overflow)
        return own

    @torch.no_grad()
    def add(self, label: Label, tensor: Tensor) -> None:
        """Queue the ``amax`` of one tensor (empty tensors are skipped)."""
        if tensor.numel() == 0:
            return
        self._labels.append(label)
        self._thresholds.append(self._threshold(tensor.dtype))
        self._pending.append(torch.linalg.vector_norm(tensor.detach(), math.inf))

    @torch.no_grad()
    def add_many(self, labels: list[Label], tensors: list[Tensor]) -> None:
        """Queue many tensors with one fused multi-tensor reduction per device."""
        kept = [(lab, t.detach()) for lab, t in zip(labels, tensors, strict=True) if t.numel()]
        if not kept:
            return
        by_device: dict[torch.device, list[int]] = {}
        for i, (_, t) in enumerate(kept):
            by_device.setdefault(t.device, []).append(i)
        norms: list[Tensor | None] = [None] * len(kept)
        for idx in by_device.values():
            fused = torch._foreach_norm([kept[i][1] for i in idx], math.inf)
            for i, n in zip(idx, fused, strict=True):
                norms[i] = n
        for (lab, t), n in zip(kept, norms, strict=True):
            self._labels.append(lab)
            self._thresholds.append(self._threshold(t.dtype))
            self._pending.append(n)

    def resolve(self) -> list[Flag]:
        """Bring the queued readings to the host (one copy per dtype) and return all flags."""
        if self._pending:
            groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
            for i, v in enumerate(self._pending):
                groups.setdefault((v.dtype, v.device), []).append(i)
            values = [0.0] * len(self._pending)
            for idx in groups.values():
                host = torch.stack([self._pending[i] for i in idx]).double().tolist()
                for i, v in zip(idx, host, strict=True):
                    values[i] = v
            start = len(self.resolved)
            for k, v in enumerate(values):
                over = math.isfinite(v) and v > self._thresholds[start + k]
                self.resolved.append(Flag(self._labels[start + k], v, over))
            self._pending.clear()
        return self.resolved
