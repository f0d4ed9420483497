"""Prototype, measured here and not applied: SINGD's step with two diagonal factors
batched over layers (a change for `singd/optim/base.py` / `singd/optim/singd.py`).

Today `_step_layers` makes, per layer, the natural-gradient scaling (`k^2`, `c^2` and two
products per parameter, `SINGD._layer_directions`) and the momentum and parameter update
(`KroneckerOptimizer._apply_update`): about 12 small dispatches per layer. The
prototype makes the same per-element operations in the same order as foreach calls over
every layer's tensors at once (one `_foreach_mul` for all squares, two for all
directions, three for momentum and parameters), so its results are bitwise equal (the
script checks it over 30 steps). It applies to one parameter group without distributed
training, where every layer has diagonal K and C; everything else takes today's path.

Run: ``python benchmarks/prototype_batched_diagonal_step.py [T]`` (T=1 by default; with
T=10 the steps that update the factors are left out, the issue's "steps between").
Prints median CPU-time ratios from interleaved blocks, three times. Written against the
optimizer internals of commit 435a28c (`_step_layers`, `_update_preconditioner`,
`_clear_accumulators`, `_reset_passes`): a refactor of those moves it.
"""

from __future__ import annotations

import statistics
import sys
import time

import mlp_step
import torch

from singd import SINGD
from singd.optim import base
from singd.structures.diagonal import DiagonalMatrix


def batched_step_layers(self) -> None:
    """`_step_layers` for all-diagonal factors, one group, one process (else today's)."""
    layers = self._layers
    groups = {layer.group_index for layer in layers}
    simple = (
        self._world() == 1
        and len(groups) == 1
        and all(
            isinstance(self._factors[layer.name][key], DiagonalMatrix)
            for layer in layers
            for key in ("K", "C")
        )
    )
    if not simple:
        return type(self)._step_layers(self)
    group = self.param_groups[next(iter(groups))]
    grad_unscaling = self._grad_scales[self.steps - 1] / self._grad_scales[self.steps] ** 2
    divisor = self._gradient_divisor()
    active = [layer for layer in layers if layer.module.weight.grad is not None]
    due = [layer for layer in active if layer.passes > 0 and self.steps % group["T"] == 0]
    for layer in due:
        self._update_preconditioner(layer, grad_unscaling)
        base._reset_passes(layer)
    for layer in layers:
        if layer not in due:
            self._clear_accumulators(layer)
    if not active:
        return None
    factors = [
        self._factors[layer.name][key].tensors()["diag"] for layer in active for key in ("K", "C")
    ]
    squares = torch._foreach_mul(factors, factors)
    grads, k_parts, c_parts, params = [], [], [], []
    for i, layer in enumerate(active):
        k2, c2 = squares[2 * i], squares[2 * i + 1]
        weight = layer.params[0]
        grads.append(weight.grad.flatten(1))
        k_parts.append(k2[:-1] if layer.has_bias else k2)
        c_parts.append(c2.unsqueeze(1))
        params.append(weight)
        if layer.has_bias:
            grads.append(layer.params[1].grad)
            k_parts.append(k2[-1])
            c_parts.append(c2)
            params.append(layer.params[1])
    if base._not_one(divisor):
        grads = torch._foreach_div(grads, divisor)
    steps = torch._foreach_mul(grads, k_parts)
    torch._foreach_mul_(steps, c_parts)
    steps = [step.reshape(p.shape) for step, p in zip(steps, params, strict=True)]
    if group["weight_decay"] != 0.0:
        torch._foreach_add_(steps, params, alpha=group["weight_decay"])
    if group["momentum"] != 0.0:
        states = [self.state[p] for p in params]
        if all("momentum_buffer" in state for state in states):
            buffers = [state["momentum_buffer"] for state in states]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, steps)
        else:
            for state, step in zip(states, steps, strict=True):
                if "momentum_buffer" in state:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(step)
                else:
                    state["momentum_buffer"] = step.clone(memory_format=torch.contiguous_format)
            buffers = [state["momentum_buffer"] for state in states]
        steps = buffers
    torch._foreach_add_(params, steps, alpha=-group["lr"])
    return None


def make(kind: str, period: int = 1):
    model, x, y = mlp_step.build()
    if kind == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    elif kind == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    else:
        kwargs = {**mlp_step.SINGD_KWARGS, "T": period}
        optimizer = SINGD(model, structures=("diagonal", "diagonal"), **kwargs)
        if kind == "batched":
            optimizer._step_layers = batched_step_layers.__get__(optimizer)
    return model, optimizer, mlp_step.make_step(model, optimizer, x, y)


def main(period: int) -> None:
    torch.set_num_threads(1)
    today, _, step_today = make("today")
    batched, _, step_batched = make("batched")
    for _ in range(30):
        step_today()
        step_batched()
    pairs = zip(today.parameters(), batched.parameters(), strict=True)
    equal = all(torch.equal(a, b) for a, b in pairs)
    print(f"parameters bitwise equal after 30 steps: {equal}")
    sides = {kind: make(kind, period) for kind in ("adamw", "sgd", "today", "batched")}
    block = 10 if period > 1 else 5
    for _ in range(3):
        times: dict[str, list[float]] = {kind: [] for kind in sides}
        for round_ in range(17):
            for kind, (_, optimizer, step) in sides.items():
                measured = []
                for _ in range(block):
                    update = period > 1 and getattr(optimizer, "steps", 1) % period == 0
                    start = time.process_time()
                    step()
                    if not update:
                        measured.append(time.process_time() - start)
                if round_ >= 2:
                    times[kind] += measured[1:]
        med = {kind: statistics.median(values) for kind, values in times.items()}
        print(
            f"T={period}: today/AdamW {med['today'] / med['adamw']:.3f}, batched/AdamW "
            f"{med['batched'] / med['adamw']:.3f}, today/SGD-m {med['today'] / med['sgd']:.3f}, "
            f"batched/SGD-m {med['batched'] / med['sgd']:.3f}, "
            f"batched/today {med['batched'] / med['today']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
