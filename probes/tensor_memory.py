"""Peak bytes of live tensors over a stretch of training, beyond what existed before it (B).

On the CPU the process's resident set is mostly the torch runtime's own (hundreds of MB
for any optimizer), so it hides what an optimizer costs. This module measures what a
training step holds instead: every tensor storage the step's operations create,
counted from its creation until it is freed, and the largest total at any moment.

- CPU (`TensorPeak`): a `TorchDispatchMode` sees every operation's outputs. A storage
  that no input of the operation holds and that is not counted yet is new; its bytes are
  added, and a finalizer on the storage (whose Python object lives as long as the
  storage itself) subtracts them when it is freed. Storages that existed before the
  stretch began (the model's parameters and buffers, the data) are never counted, so the
  figure is the peak *above* them: activations, gradients, optimizer state made in the
  stretch, temporaries. Not seen: scratch memory an operation allocates and frees inside
  its own kernel (LAPACK workspaces, for example), and tensors of subclasses such as
  DTensor (their local shards are counted where plain operations make them).
- CUDA: the allocator's own peak (``torch.cuda.max_memory_allocated``, reset when the
  stretch begins) minus what was allocated then: exact, scratch included.

`not_counted()` marks code whose tensors are not the step's (the probes' own float64
copies at their cadence): operations inside it are neither counted nor tracked.

Counting costs a Python call per operation (tens of microseconds): measure a few
steps, not a whole run.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

_LOCAL = threading.local()


@contextmanager
def not_counted() -> Iterator[None]:
    """Tensors made inside this block (in this thread) are not counted by any `TensorPeak`."""
    depth = getattr(_LOCAL, "depth", 0)
    _LOCAL.depth = depth + 1
    try:
        yield
    finally:
        _LOCAL.depth = depth


def _storage(t: object):
    if type(t) is not Tensor and type(t) is not torch.nn.Parameter:
        return None  # subclasses (DTensor, FakeTensor, ...) have no storage of their own
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def _flat(values) -> list[Tensor]:
    """The tensors among an operation's arguments or results: aten operations take and
    return tensors, lists of tensors (foreach, cat) and scalars, nested one level deep."""
    if isinstance(values, Tensor):
        return [values]
    found = []
    for v in values if isinstance(values, (tuple, list)) else ():
        if isinstance(v, Tensor):
            found.append(v)
        elif isinstance(v, (tuple, list)):
            found.extend(t for t in v if isinstance(t, Tensor))
    return found


class _CountingMode(TorchDispatchMode):
    def __init__(self, meter: TensorPeak) -> None:
        super().__init__()
        self._meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(_LOCAL, "depth", 0) == 0:
            self._meter._see(func, out, args, kwargs)
        return out


class TensorPeak:
    """Counts live tensor bytes on one device between `start` and `stop`.

    Args:
        device: The device whose tensors count (``cpu`` or a CUDA device).

    Use as a context manager or with `start` / `stop` (a stretch that spans loop
    iterations). After `stop`, ``peak_bytes`` is the largest total of counted live
    bytes seen (B) and ``live_bytes`` what was still live at `stop`.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.live_bytes = 0
        # Per counted storage (by id): its bytes and the weak reference whose callback
        # subtracts them when it is freed (dropping the reference drops the callback).
        self._live: dict[int, tuple[int, weakref.ref]] = {}
        self._mode: _CountingMode | None = None
        self._cuda_base: int | None = None  # set while counting on CUDA

    # --------------------------------------------------------------------- control
    def start(self) -> TensorPeak:
        """Begin counting (from zero); tensors alive now are never counted."""
        self.peak_bytes = self.live_bytes = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_base = torch.cuda.memory_allocated(self.device)
            return self
        self._mode = _CountingMode(self)
        self._mode.__enter__()
        return self

    def stop(self) -> TensorPeak:
        """Stop counting (idempotent); the figures stay readable."""
        if self.device.type == "cuda":
            if self._cuda_base is not None:
                torch.cuda.synchronize(self.device)
                self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._cuda_base
                self.live_bytes = torch.cuda.memory_allocated(self.device) - self._cuda_base
                self._cuda_base = None
            return self
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
            self._live.clear()  # what outlives the stretch is no longer followed
        return self

    def __enter__(self) -> TensorPeak:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------------------- counting
    def _see(self, func, out, args, kwargs) -> None:
        inputs: set[int] | None = None
        fresh = _returns_fresh(func)
        device = self.device
        live = self._live
        for t in _flat(out):
            if t.device != device:
                continue
            storage = _storage(t)
            if storage is None:
                continue
            key = id(storage)
            nbytes = storage.nbytes()
            known = live.get(key)
            if known is not None:
                if known[0] != nbytes:  # resized in place (an out= argument that grew)
                    self._count(key, storage, nbytes - known[0], nbytes, known[1])
                continue
            if not fresh:
                if inputs is None:
                    inputs = {
                        id(s)
                        for s in map(_storage, _flat((*args, *kwargs.values())))
                        if s is not None
                    }
                if key in inputs:
                    continue  # a view, an in-place result or an out= argument: not new
            self._count(key, storage, nbytes, nbytes, None)

    def _count(self, key: int, storage, added: int, nbytes: int, ref) -> None:
        if ref is None:
            ref = weakref.ref(storage, lambda _, key=key: self._freed(key))
        self._live[key] = (nbytes, ref)
        self.live_bytes += added
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes

    def _freed(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.live_bytes -= entry[0]


_FRESH: dict = {
    # torch.tensor(...): returns its input, which the constructor has just made.
    torch.ops.aten.lift_fresh.default: True,
    # Promises a new tensor but returns a view of its input's storage.
    torch.ops.aten._unsafe_view.default: False,
}
"""Per operation, whether its results are new tensors (`_returns_fresh`)."""


def _returns_fresh(func) -> bool:
    """Whether the operation's schema says every result is a new tensor (no alias
    annotation): then no result can hold an input's storage, and the inputs need not be
    read. Views, in-place and out= operations annotate their results."""
    fresh = _FRESH.get(func)
    if fresh is None:
        returns = getattr(getattr(func, "_schema", None), "returns", None)
        fresh = _FRESH[func] = returns is not None and all(r.alias_info is None for r in returns)
    return fresh
