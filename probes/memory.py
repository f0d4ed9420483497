"""The memory probe's host side: optimizer state by category and tensor, and process memory.

All figures are bytes (B).

- Optimizer state: the optimizer's own ``state_bytes()`` by category where it has one
  (SINGD, KFAC: ``factors``, ``momenta``, ``inverses``, ``param_buffers``, ``fallback``),
  otherwise the tensors of ``optimizer.state`` summed by state key (``exp_avg``,
  ``momentum_buffer``, ...); and per tensor: each curvature factor (module = layer,
  tensor = factor name) and each per-parameter state tensor (module = parameter name,
  tensor = state key).
- Beside it, what AdamW would keep for the same parameters: ``exp_avg`` and
  ``exp_avg_sq`` in each parameter's dtype plus a float32 ``step`` per parameter,
  ``sum_p (2 numel(p) itemsize(p) + 4)`` (torch's AdamW, non-capturable default).
- Process: resident set size (RSS, ``psutil``, tens of microseconds), unique set size
  (USS, milliseconds: read at a slower cadence) and the peak RSS since the session
  began. The peak is the kernel's own high-water mark (``VmHWM``), which Linux resets to
  the current RSS when ``5`` is written to ``/proc/self/clear_refs``: so it is exact and
  resets per session, but it is per process, so two sessions alive at once in one process
  share it. Where the reset is not possible (not Linux, no permission) the peak is the
  largest RSS sampled at each step (`ProcessMemory.sample`), which can miss a spike
  inside a step. The peak includes the interpreter and libraries (absolute, like the
  CUDA allocator's peak); the delta over the RSS at the session's start is reported too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import psutil
import torch
from torch import Tensor

from probes.device_memory import CudaAllocator, NvmlDevice
from probes.flags import local_shard
from probes.records import Recorder

log = logging.getLogger(__name__)
USS_EVERY = 10
"""USS costs milliseconds: read it every this many memory readings."""

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def tensor_bytes(value) -> int:
    """Bytes stored by a tensor or a structured matrix (``nbytes``); 0 for anything else."""
    if isinstance(value, Tensor):
        value = local_shard(value)  # what this rank holds
        return value.numel() * value.element_size()
    nbytes = getattr(value, "nbytes", None)
    return int(nbytes) if isinstance(nbytes, int) else 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state by category: ``state_bytes()`` or ``optimizer.state`` keys."""
    own = getattr(optimizer, "state_bytes", None)
    if callable(own):
        return {str(k): int(v) for k, v in own().items()}
    categories: dict[str, int] = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, Tensor):
                categories[key] = categories.get(key, 0) + tensor_bytes(value)
    return categories


def state_tensor_bytes(
    optimizer: torch.optim.Optimizer, names: dict[int, str]
) -> Iterator[tuple[str, str, int]]:
    """``(parameter name, state key, bytes)`` for every tensor in ``optimizer.state``."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                yield names.get(id(param), ""), str(key), tensor_bytes(value)


def factor_bytes(layers: Iterable) -> Iterator[tuple[str, str, int]]:
    """``(layer name, factor name, bytes)`` for every factor of ``curvature_state()``."""
    for layer in layers:
        for name, factor in layer.factors.items():
            yield layer.name, name, tensor_bytes(factor)


def adamw_state_bytes(params: Iterable[Tensor]) -> int:
    """Bytes torch's AdamW keeps for ``params``: two moments in their dtype, a float32 step."""
    return sum(2 * local_shard(p).numel() * p.element_size() + 4 for p in params)


def _read_hwm() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class ProcessMemory:
    """RSS, USS and a per-session peak RSS of this process (see the module docstring)."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self.kernel_peak = self._reset_peak()
        self.start_rss = self.rss()
        self._sampled_peak = self.start_rss

    @staticmethod
    def _reset_peak() -> bool:
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return _read_hwm() is not None

    def rss(self) -> int:
        return int(self._process.memory_info().rss)

    def uss(self) -> int:
        return int(self._process.memory_full_info().uss)

    def sample(self) -> None:
        """Track the peak by sampling, where the kernel's mark cannot be reset."""
        if not self.kernel_peak:
            self._sampled_peak = max(self._sampled_peak, self.rss())

    def peak(self) -> int:
        """Peak RSS since the session began (B)."""
        if self.kernel_peak:
            hwm = _read_hwm()
            if hwm is not None:
                return hwm
        return max(self._sampled_peak, self.rss())


class MemoryProbe:
    """Records the memory rows at the probe's cadence and keeps the summary's figures.

    Args:
        recorder: Where rows go.
        optimizer: The optimizer whose state is measured.
        params: The optimized parameters (for AdamW's comparison figure).
        names: ``id(parameter)`` -> qualified name.
        device: The parameters' device (CUDA allocator and NVML readings there).
    """

    def __init__(
        self,
        recorder: Recorder,
        optimizer: torch.optim.Optimizer,
        params: list[Tensor],
        names: dict[int, str],
        device: torch.device,
    ) -> None:
        self.recorder = recorder
        self.optimizer = optimizer
        self.params = params
        self.names = names
        self.process = ProcessMemory()
        self.cuda = CudaAllocator(device)
        self.nvml = NvmlDevice(device)
        if self.nvml.handle is None:
            log.info("probes: NVML readings not available: %s", self.nvml.reason)
        self.optimizer_state_bytes: int | None = None
        self._readings = 0

    def sample(self) -> None:
        """Track the peak RSS at an iteration's end (`ProcessMemory.sample`)."""
        self.process.sample()

    def record(self, step: int, layers: list) -> None:
        """Write the memory rows of step ``step``; ``layers``: ``curvature_state()``."""
        rec = self.recorder
        categories = optimizer_state_bytes(self.optimizer)
        for category, nbytes in categories.items():
            rec.add(step, "memory", "bytes", nbytes, tensor=category, unit="B")
        self.optimizer_state_bytes = sum(categories.values())
        rec.add(step, "memory", "bytes", self.optimizer_state_bytes, tensor="total", unit="B")
        rec.add(
            step,
            "memory",
            "adamw_state_bytes",
            adamw_state_bytes(self.params),
            tensor="total",
            unit="B",
        )
        for module, tensor, nbytes in factor_bytes(layers):
            rec.add(step, "memory", "bytes", nbytes, module=module, tensor=tensor, unit="B")
        for module, tensor, nbytes in state_tensor_bytes(self.optimizer, self.names):
            rec.add(step, "memory", "bytes", nbytes, module=module, tensor=tensor, unit="B")
        process = self.process
        rec.add(step, "memory", "rss_bytes", process.rss(), tensor="process", unit="B")
        rec.add(step, "memory", "peak_rss_bytes", process.peak(), tensor="process", unit="B")
        if self._readings % USS_EVERY == 0:
            rec.add(step, "memory", "uss_bytes", process.uss(), tensor="process", unit="B")
        self._readings += 1
        for module, tensor, metric, value in self.cuda.rows() + self.nvml.rows():
            unit = "" if metric == "available" else "B"
            rec.add(step, "memory", metric, value, module=module, tensor=tensor, unit=unit)

    def peak(self) -> int:
        """The run's peak memory (B): the CUDA allocator's on a GPU, else the peak RSS."""
        return self.cuda.peak() if self.cuda.device is not None else self.process.peak()

    def peak_delta(self, peak: int) -> int | None:
        """On the CPU, ``peak`` minus the RSS at attach (B); None on a GPU."""
        return peak - self.process.start_rss if self.cuda.device is None else None
