"""A probe session: hooks on a model and its optimizer that record the long table.

Steps are training iterations, counted from 0: an iteration ends when the optimizer's
step returns (a step post-hook), or, when a step is never called (``GradScaler.step``
skips ``optimizer.step`` on infinite gradients), when the next forward begins after a
backward whose readings were not finite. A backward followed by a forward with finite
readings is gradient accumulation and stays in the same iteration. An iteration is a
*skipped step* when it ended without a step, or when its step was called with torch's
GradScaler verdict ``optimizer.found_inf`` set (SINGD and KFAC take the call and skip
inside it); its readings do not count as NaN/Inf/overflow events.

Each iteration, whatever the cadences, these tensors get one fused ``aminmax`` each
(`probes.flags`), brought to the host once per iteration: the outputs (``activation``,
forward) and output gradients (``output_grad``, backward; read by a pre-hook on the
output's autograd node) of every leaf module and every module with parameters of its own
(except `FINITE_PRESERVING` ones such as ReLU, where a NaN cannot be born: those only in
full numerics iterations). The parameters after the step are checked by a sum each (half
the cost of ``aminmax``; a finite sum proves a finite tensor). When that and every
reading above are clean (finite, within the overflow threshold) the iteration ends
there. Otherwise the parameters are read exactly (``update``, step: a non-finite update
makes a non-finite parameter), so a sum that overflowed on finite values counts for
nothing; the overflow risk of parameters is thus judged every step only in such
iterations, and at the numerics cadence always. When the parameters are not finite,
the parameter gradients (``grad``, backward), the curvature factors (factor name, step)
and the momenta (``momentum``: ``momentum_buffer``, ``exp_avg`` of ``optimizer.state``,
step) are read too, in that execution order, so the first non-finite tensor is found with
its step, module, tensor and phase (see `ProbeSession._on_step_post` for why that is
enough, and its one exception, KFAC's ``A`` and ``G``). Parameter-level tensors are named
by their qualified parameter name (``0.weight``).

At their cadences (step ``s`` with ``s % every == 0``) the probes record full rows, each
probe an object with one recording method that also keeps its running summary figures:
``numerics`` (`probes.numerics.NumericsProbe`: `probes.stats` of all the tensors above,
factors included, plus ``weight`` before the step and ``update`` = the parameter's
change over the step), ``condition`` (`probes.condition.ConditionProbe`), ``memory``
(`probes.memory.MemoryProbe`, with `probes.device_memory`) and ``time``
(`probes.timing.TimeProbe`); off by default, ``whatif`` (`probes.whatif`: what each
optimizer-state tensor would lose in float16, bfloat16 and the float8 formats). A
``precision="auto"`` optimizer's dtype changes become ``precision`` rows at the end of
the iteration that made them, whatever the probes. This module is the iteration state
machine and the hooks that feed them.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch import Tensor, nn

from probes.condition import ConditionProbe
from probes.flags import Label, StepFlags, StepRecord, local_shard, read_records, watchable
from probes.limits import parse_dtype
from probes.memory import MemoryProbe
from probes.numerics import NumericsProbe
from probes.records import Recorder, finite_or_none, frame_from_rows, write_parquet
from probes.tensor_memory import not_counted
from probes.timing import TimeProbe
from probes.whatif import WHATIF_EVERY, WhatIfProbe, precision_rows

PROBES = ("condition", "numerics", "memory", "time")
DEFAULT_EVERY = {"condition": 1000, "numerics": 1000, "memory": 1000, "time": 1}
"""Default cadences in iterations: the per-tensor readings at the cadence of
``wandb.watch``'s histograms (``log_freq=1000``), and time every step (a clock read;
the peak memory is the kernel's high-water mark, kept between readings). One full
reading costs, in ms, on the benchmark MLP (256-512-512-10, batch 128, one thread,
`benchmarks/test_probe_overhead.py`) on this shared CPU: condition about 4 with SINGD's
diagonal factors and about 400 with dense ones (six float64 SVDs of up to 513 x 513),
numerics about 7, memory about 1 (USS, every `USS_EVERY` readings: 7-10), against steps
of about 4.5 ms (diagonal) and 27 ms (dense, T=10): amortized, about 0.01 ms per step
with diagonal factors. The per-iteration finiteness checks are not cadenced: they, and
the hooks they need, are most of the overhead (see the benchmark and the README's
performance section). A first non-finite value is found at the step it appears
whatever these cadences are."""
OPTIONAL_PROBES = ("whatif",)
"""Probes recorded only when named in ``probes`` (cadence `probes.whatif.WHATIF_EVERY`)."""
PENDING_LIMIT = 1000
"""Most iterations whose readings wait on the device (read-every-step off) before they are
read even though no cadence is due: bounds their memory (two numbers per reading)."""
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")
FINITE_PRESERVING = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.SiLU,
    nn.GELU,
    nn.ELU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Flatten,
    nn.Unflatten,
)
"""Parameter-free elementwise modules whose outputs, and whose input gradients, are finite
whenever their inputs and output gradients are (bounded derivatives): a NaN or Inf cannot
be born in them, so their hooks (which cost as much as a small layer's) are attached only
in the numerics probe's full iterations. Exact types: a subclass may compute otherwise."""
_GRAPH_TASK = getattr(torch._C, "_current_graph_task_id", None)


def _recomputing() -> bool:
    """Whether a forward runs inside a backward pass: activation checkpointing
    (``torch.utils.checkpoint``, reentrant or not) recomputing a segment, whose
    activations were read in the forward already. Always False where this torch does
    not tell the autograd engine's graph task (the recomputed readings then repeat)."""
    return _GRAPH_TASK is not None and _GRAPH_TASK() != -1


@dataclass(frozen=True)
class NonFinite:
    """Where a NaN or Inf was first seen: iteration, module, tensor and phase."""

    step: int
    module: str
    tensor: str
    phase: str


def _floating_tensors(output) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, list | tuple):
        return [t for t in output if isinstance(t, Tensor) and t.is_floating_point()]
    return []


def _factor_tensors(factor) -> list[Tensor]:
    return [factor] if isinstance(factor, Tensor) else list(factor.tensors().values())


class ProbeSession:
    """Records probes over a training loop: hooks on a model and its optimizer that
    write the long table. Build it with `attach`; use it as a context manager or call
    `detach`.

    Args:
        model: The model being trained (hooks go on its modules).
        optimizer: Any torch optimizer; SINGD and KFAC also expose their curvature.
        probes: Names among ``condition``, ``numerics``, ``memory``, ``time`` and
            ``whatif``; None: all but ``whatif`` (`OPTIONAL_PROBES`).
        every: One cadence (iterations) for every probe; None: each probe's default
            (`DEFAULT_EVERY`). Finiteness is checked every iteration regardless.
        run: The run id written into every row.
        rank: The rank written into every row; None: torch.distributed's rank, else 0.
        dtype: The run's low-precision dtype, which cast metrics refer to (``fp16``,
            ``bfloat16``, ``torch.float16``); None: the model's parameter dtype. Pass it
            for mixed precision, where parameters stay float32.
        allow_inf: A regex on module names whose infinities are intentional (attention
            masks); NaNs there still count.
        start_step: The number of the first iteration, for a run resumed from a
            checkpoint: records, cadences (``step % every == 0``) and
            `first_nonfinite` then follow the training's own step count.
        read_every_step: False: in iterations where no cadence is due, the readings
            wait on the device and are read at the next cadence, at `detach`,
            or when asked (`first_nonfinite`, `summary`, `to_frame`): the loop never
            waits for the device. A value born in the optimizer step is then reported
            at the ``update`` of the parameter it reached (its step and module exact).
            True: every iteration is read at its end (one wait per iteration on a GPU),
            and such a value is traced to the gradient, factor or momentum it came from.
            None (default): True where the parameters are on the CPU (there a read
            waits for nothing), False on a GPU.

    Raises:
        ValueError: On an unknown probe name, a non-positive cadence, a negative
            ``start_step`` or a bad dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        probes: list[str] | tuple[str, ...] | None = None,
        every: int | None = None,
        run: str = "",
        rank: int | None = None,
        dtype: str | torch.dtype | None = None,
        allow_inf: str | None = None,
        start_step: int = 0,
        read_every_step: bool | None = None,
    ) -> None:
        names = list(PROBES if probes is None else probes)
        known = PROBES + OPTIONAL_PROBES
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown probe {unknown[0]!r}; the probes are {', '.join(known)}.")
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            raise ValueError(f"every must be a positive integer or None, got {every!r}.")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative integer, got {start_step!r}.")
        if read_every_step is not None and not isinstance(read_every_step, bool):
            raise ValueError(
                f"read_every_step must be True, False or None, got {read_every_step!r}."
            )
        self.model = model
        self.optimizer = optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if read_every_step is None:
            # A host read waits for a device only where there is one.
            read_every_step = all(p.device.type == "cpu" for p in params)
        self.read_every_step = read_every_step
        self._pending: list[StepRecord] = []
        self.probes = tuple(names)
        self.every = {n: every or DEFAULT_EVERY.get(n, WHATIF_EVERY) for n in self.probes}
        self._params = params
        self.run_dtype = parse_dtype(dtype) if dtype is not None else self._model_dtype()
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.rank = rank
        self.recorder = Recorder(run, rank)
        self._allow_inf = re.compile(allow_inf) if allow_inf else None
        self._names = {id(p): n for n, p in model.named_parameters()}
        for i, p in enumerate(params):
            self._names.setdefault(id(p), f"param{i}")
        self._curvature = getattr(optimizer, "curvature_state", None)
        if not callable(self._curvature):
            self._curvature = None
            if "condition" in self.probes:
                warnings.warn(
                    f"probes: {type(optimizer).__name__} exposes no curvature_state(), so "
                    "the condition probe and per-factor readings have nothing to read "
                    "(only SINGD and KFAC have factors).",
                    stacklevel=3,
                )
        device = params[0].device if params else torch.device("cpu")
        # The probes: each records its own rows and keeps its summary figures.
        self._numerics = NumericsProbe(self.recorder, self.run_dtype)
        self._condition = ConditionProbe(self.recorder) if "condition" in self.probes else None
        self._memory = (
            MemoryProbe(self.recorder, optimizer, params, self._names, device)
            if "memory" in self.probes
            else None
        )
        self._time = TimeProbe(self.recorder, self.every.get("time"))
        self._whatif = (
            WhatIfProbe(self.recorder, optimizer, self._names) if "whatif" in self.probes else None
        )
        self._precision_seen = 0
        # Session totals.
        self.step = start_step
        self._start_step = start_step
        self.nan_events = 0
        self.inf_events = 0
        self.overflow_events = 0
        self.skipped_steps = 0
        self._first: NonFinite | None = None
        self._origins: set[Label] = set()
        self._flags = StepFlags(self.run_dtype)
        self._by_name = {self._names[id(p)]: p for p in params}
        self._update_labels = [(self._names[id(p)], "update", "step") for p in params]
        # The hot path's parameter check: one sum per parameter, one host copy per group
        # of parameters sharing a dtype and device (torch.stack needs both alike).
        groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for p in params:
            if watchable(p) and p.numel() > 0:
                groups.setdefault((p.dtype, p.device), []).append(p)
        self._param_groups = list(groups.values())
        self._final_peak: int | None = None
        self._before: dict[int, Tensor] = {}
        self._begin_iteration()
        self._attached = True
        self._handles = self._register()

    # ------------------------------------------------------------------------------
    # Attaching
    # ------------------------------------------------------------------------------
    def _model_dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def _register(self) -> list:
        # Under torch.compile the forward hooks run eagerly (a graph break each) rather
        # than traced: they keep Python state between calls, and their readings are
        # not part of the model's computation. Costs 0.5 us a call without compile.
        eager = torch.compiler.disable
        handles = [self.model.register_forward_pre_hook(eager(self._on_forward_pre))]
        self._occasional: list[tuple[str, nn.Module]] = []
        self._occasional_handles: list = []
        for name, module in self.model.named_modules():
            own_params = next(module.parameters(recurse=False), None) is not None
            if not (own_params or next(module.children(), None) is None):
                continue
            if type(module) in FINITE_PRESERVING:
                self._occasional.append((name, module))
            else:
                handles.append(module.register_forward_hook(eager(self._forward_hook(name))))
        handles.append(self.optimizer.register_step_pre_hook(self._on_step_pre))
        handles.append(self.optimizer.register_step_post_hook(self._on_step_post))
        return handles

    def detach(self) -> None:
        """Remove every hook; safe to call twice. A pending non-finite iteration is closed."""
        if not self._attached:
            return
        self._attached = False
        try:
            self._flush()
            # A last iteration that never reached a step: after a backward it was skipped
            # (GradScaler); a forward alone (a loop that stops on a non-finite loss) is a
            # real event, recorded at its step.
            if self._flags.nonfinite(self._allowed):
                self._close(skipped=self._backward_seen)
            # The peak is process-wide: freeze it before another session resets it.
            self._final_peak = self._peak_memory()
        finally:
            for handle in self._handles + self._occasional_handles:
                handle.remove()
            self._handles, self._occasional_handles = [], []

    def __enter__(self) -> ProbeSession:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------------------------
    # Hooks
    # ------------------------------------------------------------------------------
    def _begin_iteration(self) -> None:
        self._flags.reset()
        self._numerics.clear()
        numerics = self.every.get("numerics")
        self._full = numerics is not None and self.step % numerics == 0
        self._iter_start: float | None = None
        self._opt_start: float | None = None
        self._opt_ms = math.nan
        self._scaler_skipped = False
        self._found_inf = None
        # Whether this iteration's readings wait on the device (`_defer`): no cadence due.
        self._deferring = not (
            self.read_every_step
            or self._full
            or any(self._due(probe) for probe in ("condition", "memory", "whatif"))
        )
        self._backward_seen = False
        self._before.clear()
        self._probe_s = 0.0

    # The hooks are not decorated with torch.no_grad() (entering and leaving it costs more
    # than the rest of a hot-path hook): readings are taken of detached tensors, and the
    # branches that compute run under no_grad.
    def _on_forward_pre(self, module, args) -> None:
        if not self._attached or _recomputing():
            return
        start = time.perf_counter()
        if self._backward_seen and self._opt_start is None and self._flags.nonfinite(self._allowed):
            with torch.no_grad():
                self._close(skipped=True)
        if self._iter_start is None:
            self._iter_start = start
        if self._full and self._occasional and not self._occasional_handles:
            self._occasional_handles = [
                module.register_forward_hook(torch.compiler.disable(self._forward_hook(name)))
                for name, module in self._occasional
            ]
        self._probe_s += time.perf_counter() - start

    def _forward_hook(self, name: str):
        # Labels and gradient hooks are made once per module, not once per call.
        labels: list[Label] = []
        grad_hooks: list = []

        def label_of(i: int) -> tuple[Label, object]:
            while len(labels) <= i:
                suffix = f".{len(labels)}" if labels else ""
                labels.append((name, "activation" + suffix, "forward"))
                grad_hooks.append(self._grad_hook((name, "output_grad" + suffix, "backward")))
            return labels[i], grad_hooks[i]

        label_of(0)
        first_grad_hook = grad_hooks[0]

        def first_pre_hook(grad_outputs):
            # A pre-hook on the output's autograd node sees the same gradient as a tensor
            # hook on the output (output_nr 0) at half the registration cost.
            grad = grad_outputs[0]
            if grad is not None:
                first_grad_hook(grad)

        flags = self._flags
        perf_counter = time.perf_counter

        def hook(module, args, output) -> None:
            if not self._attached:
                return
            start = perf_counter()
            # A checkpointed segment's recomputation: its activations were read in the
            # forward; its outputs' gradient hooks are still needed (a reentrant
            # checkpoint backpropagates through the recomputed graph, not the first).
            recomputing = _recomputing()
            if type(output) is Tensor and (recomputing or not self._full):  # the hot path
                if output.is_floating_point():
                    if not recomputing:
                        flags.add(labels[0], output)
                    if output.requires_grad and torch.is_grad_enabled():
                        node = output.grad_fn
                        if node is not None and output.output_nr == 0:
                            node.register_prehook(first_pre_hook)
                        else:
                            output.register_hook(first_grad_hook)
                self._probe_s += perf_counter() - start
                return
            tensors = _floating_tensors(output)
            grad_enabled = torch.is_grad_enabled()
            for i, tensor in enumerate(tensors):
                label, grad_hook = (labels[0], grad_hooks[0]) if i == 0 else label_of(i)
                if not recomputing:
                    flags.add(label, tensor)
                    if self._full:
                        with not_counted():
                            self._numerics.measure(label, tensor.detach())
                if grad_enabled and tensor.requires_grad:
                    tensor.register_hook(grad_hook)
            self._probe_s += perf_counter() - start

        return hook

    def _grad_hook(self, label: Label):
        flags = self._flags
        perf_counter = time.perf_counter

        def hook(grad: Tensor) -> None:
            if not self._attached:
                return
            start = perf_counter()
            self._backward_seen = True
            flags.add(label, grad)
            if self._full:
                with not_counted():
                    self._numerics.measure(label, grad.detach())
            self._probe_s += perf_counter() - start

        return hook

    def _grads(self) -> tuple[list[Label], list[Tensor]]:
        with_grad = [p for p in self._params if p.grad is not None]
        labels = [(self._names[id(p)], "grad", "backward") for p in with_grad]
        return labels, [p.grad for p in with_grad]

    def _factors(self, layers: list) -> tuple[list[Label], list[Tensor]]:
        labels, tensors = [], []
        for layer in layers:
            for fname, factor in layer.factors.items():
                for t in _factor_tensors(factor):
                    labels.append((layer.name, fname, "step"))
                    tensors.append(t)
        return labels, tensors

    def _momenta(self) -> tuple[list[Label], list[Tensor]]:
        labels, tensors = [], []
        for p in self._params:
            state = self.optimizer.state.get(p, {})
            for key in MOMENTUM_KEYS:
                if isinstance(state.get(key), Tensor):
                    labels.append((self._names[id(p)], "momentum", "step"))
                    tensors.append(state[key])
        return labels, tensors

    def _updates(self) -> tuple[list[Label], list[Tensor]]:
        return self._update_labels, self._params

    def _on_step_pre(self, optimizer, args, kwargs) -> None:
        if not self._attached:
            return
        start = time.perf_counter()
        self._backward_seen = True
        if self._iter_start is None:
            self._iter_start = start
        # torch's GradScaler hands optimizers that skip by themselves (SINGD, KFAC) its
        # verdict as the attribute ``found_inf``; others it never calls on infinities.
        found_inf = getattr(optimizer, "found_inf", None)
        if self._deferring:
            self._found_inf = found_inf  # read with the iteration's readings, later
        else:
            self._scaler_skipped = found_inf is not None and bool(found_inf)
        if self._full:
            with torch.no_grad(), not_counted():
                for label, grad in zip(*self._grads(), strict=True):
                    self._numerics.measure(label, grad)
                    param = self._by_name[label[0]]
                    self._numerics.measure((label[0], "weight", "step"), param)
                    self._before[id(param)] = param.detach().clone()
        self._opt_start = time.perf_counter()
        self._probe_s += self._opt_start - start

    def _on_step_post(self, optimizer, args, kwargs) -> None:
        """Check the parameters; if they are not finite, find the origin.

        Gradients, factors and momenta are read only then (they are still alive after
        the step), and at the numerics cadence: a non-finite gradient, momentum or SINGD
        factor makes a non-finite update in the same step (SGD, AdamW, SINGD and KFAC
        all add them into the parameters), so the check on the parameters cannot miss
        one. KFAC's ``A`` and ``G`` reach the update only through the inverses, every
        ``T`` steps (and a failed inversion keeps the previous inverse), so a non-finite
        ``A`` or ``G`` is seen at the next numerics cadence or failed update.
        """
        if not self._attached:
            return
        start = time.perf_counter()
        self._opt_ms = (start - self._opt_start) * 1e3 if self._opt_start else math.nan
        if self._deferring:
            self._defer(start)
            return
        if not self._full and self._flags.clean() and self._parameters_finite():
            # The hot path: every reading of the iteration is finite and within its
            # threshold, and nothing is due that needs the step's tensors.
            self._probe_s += time.perf_counter() - start
            self._close(skipped=self._scaler_skipped)
            return
        with torch.no_grad(), not_counted():
            self._step_post(start)

    def _defer(self, start: float) -> None:
        """Close an iteration without reading anything: its readings, the parameters'
        (``update``, read exactly with ``aminmax`` rather than by sums: nothing is
        decided here) and GradScaler's verdict wait on the device (`probes.flags.
        StepRecord`) until `_flush` reads them, at the next cadence, `detach`,
        `first_nonfinite`, `summary`, `to_frame` or `gather`, and records the events and
        origins `_close` would have recorded at once. Gradients, factors and momenta are
        not read: a value born in the optimizer step is reported at the ``update`` of the
        parameter it reached, in the same step (``read_every_step=True`` traces it).
        """
        self._flags.add_many(*self._updates())
        self._pending.append(self._flags.record(self.step, self._found_inf))
        self._probe_s += time.perf_counter() - start
        closing = time.perf_counter()
        if self._memory is not None:
            self._memory.sample()
        self._end_iteration(closing)
        if len(self._pending) >= PENDING_LIMIT:
            self._flush()

    def _flush(self) -> None:
        """Read the iterations that wait on the device (one copy per dtype and device for
        all of them) and record what `_close` records: skipped steps, NaN/Inf/overflow
        events and first origins, in step order."""
        if not self._pending:
            return
        records, self._pending = self._pending, []
        for record, flags in zip(records, read_records(records), strict=True):
            if flags.skipped:
                self.skipped_steps += 1
                self.recorder.add(
                    record.step, "numerics", "skipped_step", 1.0, phase="step", unit="count"
                )
            else:
                self._count_events(record.step, flags)

    def _parameters_finite(self) -> bool:
        """Whether every parameter is finite, by sums (a false alarm only costs time).

        A finite sum proves its tensor finite; a non-finite one (also a sum of finite
        values that overflowed) sends the iteration to `_step_post`, which reads the
        parameters exactly. Kept out of the step's readings: it only decides the path.
        """
        for group in self._param_groups:
            sums = torch.stack([local_shard(p).detach().sum() for p in group]).tolist()
            if not all(-math.inf < v < math.inf for v in sums):
                return False
        return True

    def _step_post(self, start: float) -> None:
        """`_on_step_post` past the hot path: exact readings, origins, full numerics."""
        flags = self._flags
        base = len(flags)
        layers = None
        if self._full and self._curvature is not None:
            layers = self._curvature()
            flags.add_many(*self._factors(layers))
        flags.add_many(*self._updates())
        if flags.nonfinite(self._allowed, start=base):
            flags.truncate(base)
            if layers is None and self._curvature is not None:
                layers = self._curvature()
            for part in (self._grads(), self._factors(layers or []), self._momenta()):
                flags.add_many(*part)
            flags.add_many(*self._updates())
        if self._full:
            for part in (self._factors(layers or []), self._momenta()):
                for label, tensor in zip(*part, strict=True):
                    self._numerics.measure(label, tensor)
            for p in self._params:
                before = self._before.get(id(p))
                if before is not None:
                    self._numerics.measure((self._names[id(p)], "update", "step"), p - before)
        self._probe_s += time.perf_counter() - start
        self._close(skipped=self._scaler_skipped, layers=layers)

    # ------------------------------------------------------------------------------
    # Closing an iteration
    # ------------------------------------------------------------------------------
    def _allowed(self, module: str) -> bool:
        return self._allow_inf is not None and self._allow_inf.search(module) is not None

    def _close(self, *, skipped: bool, layers: list | None = None) -> None:
        start = time.perf_counter()
        self._flush()
        step, rec = self.step, self.recorder
        if skipped:
            self.skipped_steps += 1
            rec.add(step, "numerics", "skipped_step", 1.0, phase="step", unit="count")
        else:
            self._count_events(step)
        self._numerics.record(step)
        if self._memory is not None:
            self._memory.sample()
        due = [probe for probe in ("condition", "memory", "whatif") if self._due(probe)]
        if due:
            with not_counted():  # their float64 copies are the probes', not training's
                self._cadenced(step, due, layers)
        self._end_iteration(start)

    def _cadenced(self, step: int, due: list[str], layers: list | None) -> None:
        """The costly readings due at ``step``: condition numbers, memory rows, what-if."""
        if layers is None and self._curvature is not None:
            layers = self._curvature()
        if "condition" in due and self._curvature is not None:
            self._condition.record(step, layers)
        if "memory" in due:
            self._memory.record(step, layers or [])
        if "whatif" in due:
            self._whatif.record(step, layers or [])

    def _end_iteration(self, start: float) -> None:
        """Time the iteration (``start``: when the closing hook began) and begin the next."""
        end = time.perf_counter()
        probe_ms = (self._probe_s + end - start) * 1e3
        step_ms = (end - (self._iter_start or start)) * 1e3
        step = self.step
        self._time.record(step, step_ms, self._opt_ms, probe_ms)
        # A list's length: no device read, so deferred iterations record them too.
        self._precision_seen = precision_rows(self.recorder, self.optimizer, self._precision_seen)
        for handle in self._occasional_handles:
            handle.remove()
        self._occasional_handles = []
        self.step = step + 1
        self._begin_iteration()

    def _due(self, probe: str) -> bool:
        return probe in self.every and self.step % self.every[probe] == 0

    def _count_events(self, step: int, flags=None) -> None:
        flags = self._flags if flags is None else flags
        if flags.clean():
            return
        bad = flags.nonfinite(self._allowed)
        values = flags.values()
        self.nan_events += any(math.isnan(values[i]) for i in bad)
        self.inf_events += any(math.isinf(values[i]) for i in bad)
        self.overflow_events += flags.overflow()
        for i in bad:
            label = flags.labels[i]
            if label in self._origins:
                continue
            self._origins.add(label)
            module, tensor, phase = label
            self.recorder.add(
                step, "numerics", "first_nonfinite", step, module=module, tensor=tensor, phase=phase
            )
            if self._first is None:
                self._first = NonFinite(step, module, tensor, phase)

    # ------------------------------------------------------------------------------
    # Results
    # ------------------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """The records as a DataFrame with the columns of `probes.records.COLUMNS`."""
        self._flush()
        return self.recorder.to_frame()

    def save(self, path: str | Path) -> Path:
        """Write the records to Parquet (schema version in the metadata); returns the path."""
        path = Path(path)
        write_parquet(self.to_frame(), path)
        return path

    def first_nonfinite(self) -> NonFinite | None:
        """The first NaN/Inf in execution order (skipped steps excluded), or None.

        Reads the iterations whose readings wait on the device (a host read, which waits
        for the device): a loop that calls it every step stops at the first NaN.
        """
        self._flush()
        return self._first

    def gather(self, dst: int = 0) -> pd.DataFrame | None:
        """Gather every rank's records on rank ``dst`` (``gather_object``; a collective).

        Call it on every rank. The other ranks return as soon as they have sent, so let
        the ranks leave together (``dist.barrier()``) before ``destroy_process_group``:
        with gloo, a group destroyed while ``dst`` still receives can abort a process.

        Returns:
            All ranks' records on ``dst``, None on the other ranks; this session's own
            records when torch.distributed is not initialized.
        """
        self._flush()
        if not (dist.is_available() and dist.is_initialized()):
            return self.to_frame()
        mine = dist.get_rank()
        gathered: list | None = [None] * dist.get_world_size() if mine == dst else None
        dist.gather_object(self.recorder.rows, gathered, dst=dst)
        if mine != dst:
            return None
        return frame_from_rows([row for rows in gathered for row in rows])

    def _peak_memory(self) -> int | None:
        return self._memory.peak() if self._memory is not None else None

    def summary(self) -> dict:
        """The run's figures, as DESIGN.md defines them; non-finite numbers become None.

        Returns:
            ``steps`` (iterations this session saw), ``nan_events``, ``inf_events``,
            ``overflow_events`` (iterations with any such reading, skipped steps
            excluded), ``skipped_steps``,
            ``underflow_fraction`` (largest recorded, fraction), ``max_condition``
            (largest condition number of any factor or preconditioner recorded, None
            without one), ``first_nonfinite_step``, ``optimizer_state_bytes`` (B, last
            memory reading), ``step_time_ms`` (median over iterations, ms),
            ``peak_memory_bytes`` (B: CUDA allocator peak since attach, else the
            process's peak RSS since attach, see `probes.memory`; frozen at detach),
            ``peak_memory_delta_bytes`` (B: CPU only, that peak minus the RSS at attach)
            and ``probe_overhead_fraction`` (time in the probes / iteration time).
        """
        self._flush()
        peak = self._peak_memory() if self._attached else self._final_peak
        delta = None if peak is None else self._memory.peak_delta(peak)
        condition = self._condition
        return {
            "steps": self.step - self._start_step,
            "nan_events": self.nan_events,
            "inf_events": self.inf_events,
            "overflow_events": self.overflow_events,
            "skipped_steps": self.skipped_steps,
            "underflow_fraction": finite_or_none(self._numerics.max_underflow),
            "max_condition": finite_or_none(condition.max_condition if condition else None),
            "first_nonfinite_step": self._first.step if self._first else None,
            "optimizer_state_bytes": (
                self._memory.optimizer_state_bytes if self._memory is not None else None
            ),
            "step_time_ms": self._time.median_step_ms(),
            "peak_memory_bytes": peak,
            "peak_memory_delta_bytes": delta,
            "probe_overhead_fraction": self._time.overhead_fraction(),
        }


def attach(model: nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> ProbeSession:
    """Attach probes to a model and its optimizer; use as a context manager or `detach`.

    Args:
        model: The model being trained (hooks go on its modules).
        optimizer: Any torch optimizer; SINGD and KFAC also expose their curvature.
        **options: The keyword arguments of `ProbeSession` (``probes``, ``every``, ``run``,
            ``rank``, ``dtype``, ``allow_inf``, ``start_step``, ``read_every_step``).

    Returns:
        The attached `ProbeSession`.
    """
    return ProbeSession(model, optimizer, **options)
