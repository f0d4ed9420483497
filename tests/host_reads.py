"""Count the host reads a piece of code makes: the reads that, on a GPU, wait for the device.

A host read is any way a tensor's value reaches Python: ``item()``, ``bool()``,
``float()``, ``int()`` (all dispatched as ``aten._local_scalar_dense``), a copy from a
non-CPU device to the CPU (``aten._to_copy``/``aten.copy_``), and ``tolist()`` and
``numpy()``, which read memory without dispatching (counted by wrapping them). On a GPU
each one waits until every queued kernel has run. On the CPU they cost nothing, so the
tests count them there: the count is the same on every device.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR = torch.ops.aten._local_scalar_dense.default
_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


def _is_cpu(value) -> bool:
    return not isinstance(value, torch.Tensor) or value.device.type == "cpu"


class HostReads(TorchDispatchMode):
    """A dispatch mode counting host reads (``count``) by kind (``kinds``), while active."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: dict[str, int] = {}
        self._saved: dict[str, object] = {}

    @property
    def count(self) -> int:
        return sum(self.kinds.values())

    def _add(self, kind: str) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SCALAR:
            self._add("item")
        elif func in _COPIES:
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            if func is torch.ops.aten.copy_.default:
                to_host = _is_cpu(args[0])
            else:
                device = kwargs.get("device")
                to_host = device is not None and torch.device(device).type == "cpu"
            if to_host and not _is_cpu(source):
                self._add("device_to_host")
        return func(*args, **kwargs)

    def __enter__(self):
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapped(tensor, *args, _original=original, _name=name, **kwargs):
                self._add(_name)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return super().__exit__(*exc)
