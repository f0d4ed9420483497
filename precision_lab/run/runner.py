"""One training run of a suite: build, train with probes attached, summarize.

`train` follows a `RunPlan`: it loads the plan's workload
(`precision_lab.workloads.workload.Workload`: the built-ins and a user's alike), builds
its model from the seed, casts it (``pure``) or keeps float32 master weights under
autocast (``mixed``, with a GradScaler for float16), builds the optimizer from its spec,
attaches the probes, trains on the workload's batches (their floating tensors cast to the
run's dtype, integer ones as they are) with the workload's loss, scores the trained model
with the workload's metric, and returns the run's summary figures with every record it
wrote. A run that diverges is stopped early and returned as a result; Ctrl-C during a run
returns what was recorded, marked unfinished.

Under torch.distributed (torchrun) each rank trains on its slice of every batch (of every
tensor in it, along its first dimension), the model is wrapped in DistributedDataParallel,
the loss that decides divergence is the mean over ranks (so every rank stops at the same
step), and rank 0 gathers all records.
A run that raises on a rank cannot be recorded in step (the other ranks wait in a
collective it will never join): `RankFailedError` stops the suite instead of letting it hang.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

import probes
from precision_lab.dtypes import dtype_name
from precision_lab.run.resolve import resolve_workload
from precision_lab.run.suite import FILE_LOCATIONS, RunPlan
from precision_lab.run.summary import MEMORY_STEPS, learned
from precision_lab.workloads.builtin import build_module
from precision_lab.workloads.knobs import Condition
from precision_lab.workloads.workload import (
    Workload,
    as_score,
    call_model,
    cast_inputs,
    map_floating,
    map_tensors,
    tensors,
)
from probes.memory import optimizer_state_bytes
from probes.records import Recorder, frame_from_rows
from probes.tensor_memory import TensorPeak, not_counted
from singd.curvature import KFAC_ROLES, SINGD_ROLES

PROBE_FIGURES = (
    "nan_events",
    "inf_events",
    "skipped_steps",
    "overflow_events",
    "underflow_fraction",
    "max_condition",
    "peak_memory_bytes",
    "step_time_ms",
)
"""Summary fields the probes' session summary gives under the same names."""

DIVERGENCE_FACTOR = 10.0
"""A run has diverged when its loss exceeds this multiple of its first loss (DESIGN.md)."""


@dataclass
class Outcome:
    """A run's summary fields (DESIGN.md names, before the control is joined) and records.

    ``interrupted`` is True when Ctrl-C stopped the run; the suite then stops too.
    """

    summary: dict[str, Any]
    records: pd.DataFrame = field(default_factory=lambda: frame_from_rows([]))
    interrupted: bool = False


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _mean_over_ranks(value: float, device: torch.device) -> float:
    if _world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


class RankFailedError(RuntimeError):
    """A run raised on one rank of several (torchrun): the other ranks wait in a
    collective this rank will never join, so the suite cannot go on in step and stops.

    The rank whose run raised is often not rank 0, and what the others see is only their
    collective breaking when it leaves ("Connection closed by peer"). So, given the
    job's rendezvous store, each failing rank leaves its error there under the run's id
    and reads what the others left: the error it records and reports puts theirs first
    (the cause, usually), then its own. The store is a courtesy channel: where it cannot
    be reached (its host process is gone), each rank reports its own error alone.

    Attributes:
        outcome: This rank's outcome of the run (its summary with the error and its own
            records, not gathered), for rank 0 to record before the suite stops; its
            ``error`` names the other ranks' errors found in the store.
    """

    def __init__(
        self,
        run: str,
        error: str,
        outcome: Outcome,
        *,
        started: bool = True,
        store: dist.Store | None = None,
    ) -> None:
        rank, world = _world()
        others = _exchange_errors(store, run, rank, world, error)
        if others:
            error = "; ".join([*others, f"then rank {rank}: {error}"])
            outcome.summary["error"] = error
        super().__init__(
            f"rank {rank} of {world}: run {run} {'failed' if started else 'could not start'} "
            f"({error}); the other ranks cannot go on in step without it, so the suite stops "
            "here (the runs finished before it are recorded)"
        )
        self.outcome = outcome


def _exchange_errors(
    store: dist.Store | None, run: str, rank: int, world: int, error: str
) -> list[str]:
    """Leave this rank's error for ``run`` in ``store``; the errors other ranks left."""
    if store is None:
        return []
    key = f"precision-lab/failed/{run}/rank"
    try:
        store.set(f"{key}{rank}", error)
        return [
            f"rank {other}: {store.get(f'{key}{other}').decode(errors='replace')}"
            for other in range(world)
            if other != rank and store.check([f"{key}{other}"])
        ]
    except (RuntimeError, OSError):  # the store's host is gone: report this rank's own error
        return []


def _fallback_name(optimizer: torch.optim.Optimizer) -> str | None:
    fallback = getattr(optimizer, "fallback", None)
    return None if fallback is None else type(fallback).__name__


def _coverage(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``preconditioned_fraction`` and ``coverage`` of a Kronecker optimizer (read after
    training: final after the first step); both null for a first-order one."""
    report = getattr(optimizer, "coverage", None)
    if report is None:
        return {"preconditioned_fraction": None, "coverage": None}
    cov = report()
    return {"preconditioned_fraction": cov.fraction, "coverage": cov.as_dict()}


def _escalation(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``precision_events``, ``promoted_fraction`` and ``promoted_bytes`` of a
    ``precision="auto"`` optimizer at the end of its run; all null for any other.

    A factor counts as promoted when its dtype is no longer the one its side started in
    (the ``from_dtype`` of that layer and side's first event: SINGD's momenta follow their
    factor without an event of their own); its extra bytes are its elements times the
    growth of its element size.
    """
    if getattr(optimizer, "precision", None) != "auto":
        return dict.fromkeys(("precision_events", "promoted_fraction", "promoted_bytes"))
    events = optimizer.precision_events
    # Sides by the factors' names: a factor an event names may be absent from the view
    # now (KFAC drops a statistic that went non-finite until its next update).
    roles = SINGD_ROLES | KFAC_ROLES
    start: dict[tuple[str, str], torch.dtype] = {}
    for event in events:
        side = roles[event.factor].side
        start.setdefault((event.layer, side), getattr(torch, event.from_dtype))
    layers = optimizer.curvature_state()
    total = promoted = extra = 0
    for layer in layers:
        for name, factor in layer.factors.items():
            stored = (
                [factor] if isinstance(factor, torch.Tensor) else list(factor.tensors().values())
            )
            total += 1
            began = start.get((layer.name, layer.roles[name].side), stored[0].dtype)
            if stored[0].dtype != began:
                promoted += 1
                growth = stored[0].element_size() - torch.empty((), dtype=began).element_size()
                extra += growth * sum(t.numel() for t in stored)
    return {
        "precision_events": len(events),
        "promoted_fraction": promoted / total if total else 0.0,
        "promoted_bytes": extra,
    }


def score(
    workload: Workload, model: nn.Module, dtype: torch.dtype, mode: str, factor: float = 1.0
) -> float:
    """The workload's metric of the trained ``model`` (unwrapped from DDP), in [0, 1]: in
    eval mode, without gradients, under the run's autocast, the model scaling the floating
    tensors it is called with by the run's input ``factor`` (its condition's, as the
    training inputs were) and casting them to the run's input dtype.

    Raises:
        ValueError: The metric returned something other than a number in [0, 1].
    """
    device = next(model.parameters()).device
    was_training = model.training
    handle = cast_inputs(model, dtype if mode == "pure" else torch.float32, factor)
    model.eval()
    try:
        with torch.no_grad(), _autocast(device, dtype, mode):
            value = workload.metric(model)
    finally:
        handle.remove()
        model.train(was_training)
    result = as_score(value)
    if result is None:
        raise ValueError(f"metric {workload.score_name} returned {value!r}, not a number in [0, 1]")
    return result


def _to_run(data, device: torch.device, dtype: torch.dtype, rank: int, world: int):
    """A batch's inputs or targets on ``device``, this rank's slice of each tensor, the
    floating tensors in ``dtype`` (token ids and labels keep theirs)."""
    if world > 1:
        data = map_tensors(data, lambda t: t[rank::world] if t.dim() else t)
    data = map_floating(data, lambda t: t.to(device, dtype))
    return map_tensors(data, lambda t: t.to(device))


REFERENCE_SEED = 0
"""Seed of the batches whose largest floating input sets an input-scaling condition's
factor (`_input_factor`), for every run of a workload whatever its own seed."""

_MAX_ABS: dict[tuple[Workload, int], float] = {}


def _input_factor(workload: Workload, steps: int, condition: Condition) -> float:
    """The factor on every floating input under ``condition``: 1 unless it scales inputs
    to a maximum; then that maximum over the largest ``|x|`` among the floating inputs of
    the first ``steps`` batches of `REFERENCE_SEED` (the training inputs of a run that
    long: for the digits, at 30 steps or more, the whole training set's 37.9). One factor
    for every seed, every run and its control, and the metric's inputs alike."""
    if condition.input_max is None:
        return 1.0
    key = (workload, steps)
    if key not in _MAX_ABS:
        drawn = islice(workload.batches(REFERENCE_SEED), steps)
        _MAX_ABS[key] = max(
            (
                float(t.abs().max())
                for inputs, _ in drawn
                for t in tensors(inputs)
                if t.is_floating_point() and t.numel()
            ),
            default=0.0,
        )
    return condition.input_factor(_MAX_ABS[key])


def _autocast(device: torch.device, dtype: torch.dtype, mode: str):
    return torch.autocast(device.type, dtype=dtype, enabled=mode == "mixed")


def train(
    plan: RunPlan,
    *,
    device: torch.device,
    every: int,
    failure_dir: Path | None = None,
    store: dist.Store | None = None,
    sharding: str = "ddp",
) -> Outcome:
    """Run ``plan`` to the end, to divergence, or to Ctrl-C, and summarize it.

    Warnings raised while building and training (an optimizer moving a layer to its
    fallback, say) are kept in the summary's ``warnings``, not printed over the progress
    bar.

    Args:
        plan: The run.
        device: Where to train.
        every: Cadence, in steps, of the probes' expensive metrics.
        failure_dir: Where KFAC writes reproducers of failed decompositions, under
            ``<failure_dir>/<run id>/``.
        store: Under torch.distributed, the job's rendezvous store, where a rank whose
            run fails leaves its error for the others (see `RankFailedError`).
        sharding: Under torch.distributed, ``ddp`` or ``fsdp`` (`distribute`).

    Returns:
        The run's summary fields (units: bytes, steps, ms, the loss's nats) and records.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = _train(
            plan,
            device=device,
            every=every,
            failure_dir=failure_dir,
            store=store,
            sharding=sharding,
        )
    outcome.summary["warnings"] = list(dict.fromkeys(str(w.message) for w in caught))
    return outcome


def distribute(model: nn.Module, sharding: str) -> nn.Module:
    """The model as several ranks train it: inside DistributedDataParallel (``ddp``), or
    sharded with FSDP2 (``fsdp``: ``fully_shard`` on each child with parameters, so a
    block's attention is gathered whole for its forward, then on the root)."""
    if sharding == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if next(child.parameters(), None) is not None:
            fully_shard(child)
    fully_shard(model)
    return model


def _train(
    plan: RunPlan,
    *,
    device: torch.device,
    every: int,
    failure_dir: Path | None,
    store: dist.Store | None,
    sharding: str = "ddp",
) -> Outcome:
    rank, world = _world()
    condition = plan.condition  # its hyperparameters are already in plan.hyperparameters
    spec = plan.spec
    workload = resolve_workload(plan.source or plan.model, plan.batch_size, kronecker=False)
    dtype, mode = plan.dtype, plan.mode
    input_dtype = dtype if mode == "pure" else torch.float32

    model = build_module(workload, plan.seed).to(device)
    if mode == "pure":
        model.to(dtype)
    if world > 1:
        model = distribute(model, sharding)
    # A place to write comes from the caller alone, never from the plan's hyperparameters
    # (a suite file's): reproducers stay inside the run directory.
    overrides = {k: v for k, v in plan.hyperparameters.items() if k not in FILE_LOCATIONS}
    if spec.family == "kfac" and failure_dir is not None:
        # One folder per run (the run id's parts as nested folders): runs never mix.
        overrides["failure_dir"] = str(failure_dir.joinpath(*plan.run_id.split("/")))
    # Tensor bytes above the model's own, from the optimizer's construction on (its state
    # counts) through the first MEMORY_STEPS steps; the data and the probes' own readings
    # are not counted.
    meter = TensorPeak(device).start()
    try:
        optimizer = spec.build(model, overrides)
        scaler = (
            torch.amp.GradScaler(device.type)
            if mode == "mixed" and dtype == torch.float16
            else None
        )
        train_rows = Recorder(run=plan.run_id, rank=rank)
        # Only SINGD and KFAC have factors whose condition numbers the condition probe reads.
        names = [
            p for p in probes.PROBES if p != "condition" or hasattr(optimizer, "curvature_state")
        ]
        names.append("whatif")  # at the costly readings' cadence: what the state would lose
        with not_counted():
            session = probes.attach(
                model, optimizer, probes=names, every=every, run=plan.run_id, dtype=dtype
            )
    except BaseException:
        meter.stop()
        raise
    factor = 1.0
    first_loss: float | None = None
    loss_value = math.nan
    diverged = interrupted = False
    loss_nonfinite_step: int | None = None
    error: str | None = None
    step = 0
    try:
        factor = _input_factor(workload, plan.steps, condition)
        with not_counted():
            batches = iter(workload.batches(plan.seed))
        for step in range(plan.steps):
            with not_counted():
                batch = next(batches, None)
            if batch is None:
                break  # the workload's batches ran out: the run ends here
            scaled_batch = (Condition.scale_inputs(batch[0], factor), batch[1])
            inputs, targets = (_to_run(t, device, input_dtype, rank, world) for t in scaled_batch)
            with _autocast(device, dtype, mode):
                loss = workload.compute_loss(call_model(model, inputs), targets)
            loss_value = _mean_over_ranks(float(loss.detach()), device)
            train_rows.add(
                step, "train", "loss", loss_value, tensor="loss", dtype=dtype_name(dtype)
            )
            if first_loss is None:
                first_loss = loss_value
            if not math.isfinite(loss_value) or loss_value > DIVERGENCE_FACTOR * first_loss:
                diverged = True
                if not math.isfinite(loss_value):
                    loss_nonfinite_step = step
                break
            optimizer.zero_grad(set_to_none=True)
            scaled = loss * condition.loss_multiplier
            if scaler is None:
                scaled.backward()
                optimizer.step()
            else:
                train_rows.add(step, "train", "grad_scale", scaler.get_scale(), tensor="grad_scale")
                scaler.scale(scaled).backward()
                scaler.step(optimizer)
                scaler.update()
            if step == MEMORY_STEPS - 1:
                meter.stop()
        else:
            step = plan.steps
    except KeyboardInterrupt:
        interrupted = True
    except Exception as err:  # a crash is one run's result; the suite goes on
        error = f"{type(err).__name__}: {err}"
    finally:
        meter.stop()
        session.detach()

    probe_summary = session.summary()
    acc = None
    if workload.metric is not None and not (interrupted or error):
        try:
            # DDP wraps the model; FSDP2 shards it in place (its forward gathers the weights).
            ddp = isinstance(model, nn.parallel.DistributedDataParallel)
            plain = model.module if ddp else model
            acc = score(workload, plain, dtype, mode, factor)
        except KeyboardInterrupt:
            interrupted = True
        except Exception as err:  # the metric's failure is the run's: it has no figure
            error = f"{type(err).__name__} in the metric: {err}"
    finished = not (interrupted or error)
    if acc is not None:
        train_rows.add(
            step, "train", "test_accuracy", acc, tensor="accuracy", module=workload.score_name
        )
    first_nonfinite = [
        s for s in (probe_summary["first_nonfinite_step"], loss_nonfinite_step) if s is not None
    ]
    summary = {
        **plan.coordinates,
        "steps": step,
        "finished": finished,
        "diverged": diverged,
        **{name: probe_summary[name] for name in PROBE_FIGURES},
        "first_nonfinite_step": min(first_nonfinite) if first_nonfinite else None,
        "optimizer_state_bytes": sum(optimizer_state_bytes(optimizer).values()),
        # Only a run that took every measured step has the figure the others have.
        "peak_tensor_bytes": (meter.peak_bytes if step >= min(MEMORY_STEPS, plan.steps) else None),
        "final_loss": loss_value,
        "accuracy": acc,
        "metric_name": workload.score_name,
        "learned": learned(
            first_loss=first_loss,
            final_loss=loss_value,
            accuracy=acc if workload.chance is not None else None,
            chance=workload.chance,
            diverged=diverged,
            finished=finished,
        ),
        "fallback_optimizer": _fallback_name(optimizer),
        **_coverage(optimizer),
        **_escalation(optimizer),
        "error": error,
        "hyperparameters": spec.hyperparameters(plan.hyperparameters),
    }
    records = pd.concat([session.to_frame(), train_rows.to_frame()], ignore_index=True)
    if error is not None and world > 1:
        raise RankFailedError(
            plan.run_id, error, Outcome(summary, records, interrupted), store=store
        )
    return Outcome(summary, _gather(records), interrupted)


def _gather(records: pd.DataFrame) -> pd.DataFrame:
    """All ranks' records on rank 0 (other ranks return theirs unchanged)."""
    rank, world = _world()
    if world == 1:
        return records
    frames: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(records, frames, dst=0)
    return pd.concat(frames, ignore_index=True) if rank == 0 else records
