"""What-if dtypes: what each optimizer-state tensor would lose if it were stored narrower.

Off by default; on with ``attach(..., probes=[..., "whatif"])`` at its cadence
(`WHATIF_EVERY`, or ``every``). Nothing in the run changes: each tensor is cast to each
dtype of `WHATIF_DTYPES` aside, and compared with itself in float64.

Tensors: every factor of ``curvature_state()`` (SINGD's ``K``, ``C``, ``m_K``, ``m_C``;
KFAC's ``A``, ``G``, ``A_inv``, ``G_inv``; a structured matrix as its stored entries)
with the layer as module and the factor's name as tensor, and every floating tensor of
``optimizer.state`` (``momentum_buffer``, AdamW's ``exp_avg``, ``exp_avg_sq``) and of a
Kronecker optimizer's fallback, with the parameter's name as module and the state key
as tensor. Rows: probe ``whatif``, phase ``step``, ``dtype`` the dtype considered
(torch names: ``float8_e4m3fn``), metrics over the finite nonzero entries ``x``, with
``max`` the dtype's largest finite number and ``tiny`` its smallest normal one:

- ``underflow_fraction`` (fraction): ``|x| < tiny``: would become subnormal or zero;
- ``overflow_fraction`` (fraction): ``|x| > max``: would be inf (NaN for e4m3fn, which
  has no inf) or, for values within half a unit of ``max``, be rounded down to it
  (counted: they have no headroom left);
- ``rounding_error`` (relative): ``||cast(x) - x||_2 / ||x||_2`` in float64 over the
  entries that do not overflow (the overflowing ones are counted above), underflow
  included; NaN when there is no such entry;
- ``bytes_saved`` (B): ``numel * (itemsize(current) - itemsize(dtype))``, negative
  where the dtype is wider than the tensor's.

and one row per tensor with ``dtype`` the tensor's own (stored) dtype: ``stored_bytes``
(B), its ``numel * itemsize`` now, so that readers know what each saving is measured
against (a ``precision="auto"`` factor changes its stored dtype during a run).

Also `precision_rows`: a ``precision="auto"`` optimizer's `precision_events`, one row
each (probe ``precision``, module the layer, tensor the factor, dtype the new dtype,
metric the reading that crossed its bound, value the reading).
"""

from __future__ import annotations

import torch
from torch import Tensor

from probes.flags import local_shard
from probes.limits import dtype_name
from probes.records import Recorder

WHATIF_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
WHATIF_EVERY = 1000
"""Default cadence: the costly readings' (`probes.session.DEFAULT_EVERY`)."""
STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")


def whatif(x: Tensor, dtype: torch.dtype) -> dict[str, float]:
    """The four what-if figures of storing ``x`` in ``dtype`` (see the module doc)."""
    return whatif_many(x, (dtype,))[dtype]


def whatif_many(x: Tensor, dtypes: tuple[torch.dtype, ...]) -> dict[torch.dtype, dict]:
    """`whatif` of ``x`` for each of ``dtypes``, sharing the float64 copy of its finite
    nonzero entries and reading the host once. Overflowing entries are masked out of the
    error and the norm (``where``) rather than indexed away: their cast (inf, or NaN in
    e4m3fn) never enters a sum."""
    wide = x.detach().flatten().to(torch.float64)
    values = wide[torch.isfinite(wide) & (wide != 0)]
    magnitude = values.abs()
    count = values.numel()
    zero = values.new_zeros(())
    stats = []
    for dtype in dtypes:
        info = torch.finfo(dtype)
        over = magnitude > info.max
        error = torch.where(over, zero, values.to(dtype).to(torch.float64) - values)
        stats += [
            (magnitude < info.tiny).sum().to(torch.float64),
            over.sum().to(torch.float64),
            torch.linalg.vector_norm(error),
            torch.linalg.vector_norm(torch.where(over, zero, values)),
        ]
    host = torch.stack(stats).tolist() if stats else []
    found = {}
    for i, dtype in enumerate(dtypes):
        under, overflow, error_norm, kept_norm = host[4 * i : 4 * i + 4]
        found[dtype] = {
            "underflow_fraction": under / count if count else 0.0,
            "overflow_fraction": overflow / count if count else 0.0,
            "rounding_error": error_norm / kept_norm if kept_norm > 0 else float("nan"),
            "bytes_saved": float(
                x.numel() * (x.element_size() - torch.empty((), dtype=dtype).element_size())
            ),
        }
    return found


UNITS = {
    "underflow_fraction": "fraction",
    "overflow_fraction": "fraction",
    "rounding_error": "relative",
    "bytes_saved": "B",
    "stored_bytes": "B",
}


def state_tensors(
    optimizer: torch.optim.Optimizer, layers: list, names: dict[int, str]
) -> list[tuple[str, str, Tensor]]:
    """(module, tensor name, tensor) of every optimizer-state tensor the probe reads."""
    found = []
    for layer in layers:
        for fname, factor in layer.factors.items():
            stored = [factor] if isinstance(factor, Tensor) else list(factor.tensors().values())
            flat = torch.cat([local_shard(t.detach()).flatten() for t in stored])
            found.append((layer.name, fname, flat))
    optimizers = [optimizer, getattr(optimizer, "fallback", None)]
    for opt in (o for o in optimizers if o is not None):
        for p, state in opt.state.items():
            for key in STATE_KEYS:
                value = state.get(key)
                if isinstance(value, Tensor) and value.is_floating_point():
                    # Under FSDP2 the momenta are DTensors: this rank's shard is what it holds.
                    found.append((names.get(id(p), "param"), key, local_shard(value)))
    return found


class WhatIfProbe:
    """Records the what-if rows of every optimizer-state tensor (see the module doc).

    Args:
        recorder: Where the rows go.
        optimizer: The optimizer whose state is read.
        names: Parameter id -> qualified name.
    """

    def __init__(self, recorder: Recorder, optimizer: torch.optim.Optimizer, names: dict) -> None:
        self.recorder = recorder
        self.optimizer = optimizer
        self.names = names

    def record(self, step: int, layers: list) -> None:
        """One row per tensor, dtype and metric, and its ``stored_bytes``."""
        for module, tensor, x in state_tensors(self.optimizer, layers, self.names):
            self.recorder.add(
                step,
                "whatif",
                "stored_bytes",
                float(x.numel() * x.element_size()),
                module=module,
                tensor=tensor,
                phase="step",
                dtype=dtype_name(x.dtype),
                unit=UNITS["stored_bytes"],
            )
            for dtype, figures in whatif_many(x, WHATIF_DTYPES).items():
                for metric, value in figures.items():
                    self.recorder.add(
                        step,
                        "whatif",
                        metric,
                        value,
                        module=module,
                        tensor=tensor,
                        phase="step",
                        dtype=dtype_name(dtype),
                        unit=UNITS[metric],
                    )


def precision_rows(recorder: Recorder, optimizer: torch.optim.Optimizer, seen: int = 0) -> int:
    """One ``precision`` row per event of ``optimizer.precision_events`` after the first
    ``seen``; returns how many events there are now."""
    events = getattr(optimizer, "precision_events", [])
    for event in events[seen:]:
        recorder.add(
            event.step,
            "precision",
            event.metric,
            event.value,
            module=event.layer,
            tensor=event.factor,
            phase="step",
            dtype=event.to_dtype,
        )
    return len(events)
