"""The memory probe's device side: the CUDA allocator's figures and NVML's, in bytes (B).

- ``cuda``: ``torch.cuda.memory_stats`` current (``allocated_bytes``) and peak
  (``peak_bytes``) allocated bytes of this process on the device; the peak is reset when
  the session starts, so it is the session's own.
- ``nvml``: from NVML (the ``nvidia-ml-py`` distribution, imported as ``pynvml``):
  ``device_used_bytes``, the device's used memory as NVML counts it, which INCLUDES OTHER
  PROCESSES AND THE CUDA CONTEXT (rows carry module ``device (all processes + CUDA
  context)``); and ``process_used_bytes``, this process's usage, where NVML reports it
  (not under MIG, and not where the container's PID namespace hides our PID: then an
  ``available`` 0 row with module ``process``). The NVML device is the one whose UUID is
  torch's device UUID; under MIG, torch sees a MIG instance, so the MIG devices of every
  MIG-enabled GPU are searched too, and the instance's own memory is reported.

Without CUDA or NVML a row with metric ``available`` and value 0 says so (module names
the reason) and nothing fails.
"""

from __future__ import annotations

import os

import torch

DEVICE_LABEL = "device (all processes + CUDA context)"

Row = tuple[str, str, str, float]
"""``(module, tensor, metric, value)``; unit B except for ``available``."""


def _plain_uuid(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode()
    text = text.lower()
    for prefix in ("mig-", "gpu-"):
        text = text.removeprefix(prefix)
    return text


class NvmlDevice:
    """The NVML handle of torch's CUDA device, matched by UUID (MIG-aware).

    Args:
        device: The CUDA device the model lives on, or None when there is none.
    """

    def __init__(self, device: torch.device | None) -> None:
        self.handle = None
        self.is_mig = False
        self.reason = ""
        if device is None or device.type != "cuda":
            self.reason = "no CUDA device in use"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as err:  # ImportError, NVMLError_LibraryNotFound, driver errors
            self.reason = f"NVML not available ({type(err).__name__})"
            return
        self._nvml = pynvml
        wanted = _plain_uuid(str(torch.cuda.get_device_properties(device).uuid))
        self.handle, self.is_mig = self._find(wanted)
        if self.handle is None:
            self.reason = f"no NVML device has torch's UUID {wanted}"

    def _find(self, wanted: str):
        nvml = self._nvml
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            if _plain_uuid(nvml.nvmlDeviceGetUUID(handle)) == wanted:
                return handle, False
            try:
                current, _pending = nvml.nvmlDeviceGetMigMode(handle)
            except nvml.NVMLError:
                continue
            if current != nvml.NVML_DEVICE_MIG_ENABLE:
                continue
            for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                try:
                    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
                except nvml.NVMLError:
                    continue
                if _plain_uuid(nvml.nvmlDeviceGetUUID(mig)) == wanted:
                    return mig, True
        return None, False

    def rows(self) -> list[Row]:
        """The NVML rows of one reading (an ``available`` 0 row when NVML cannot tell)."""
        if self.handle is None:
            return [(self.reason, "nvml", "available", 0.0)]
        nvml = self._nvml
        rows: list[Row] = [
            (DEVICE_LABEL, "nvml", "available", 1.0),
            (
                DEVICE_LABEL,
                "nvml",
                "device_used_bytes",
                float(nvml.nvmlDeviceGetMemoryInfo(self.handle).used),
            ),
        ]
        used = None
        try:
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if proc.pid == os.getpid():
                    used = proc.usedGpuMemory
        except nvml.NVMLError:
            used = None
        if used is None:
            rows.append(("process", "nvml", "available", 0.0))
        else:
            rows.append(("process", "nvml", "process_used_bytes", float(used)))
        return rows


class CudaAllocator:
    """Current and peak allocated bytes of torch's caching allocator on one device."""

    def __init__(self, device: torch.device | None) -> None:
        self.device = device if device is not None and device.type == "cuda" else None
        if self.device is not None:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        if self.device is None:
            return None
        return int(torch.cuda.memory_stats(self.device).get("allocated_bytes.all.peak", 0))

    def rows(self) -> list[Row]:
        if self.device is None:
            return [("no CUDA device in use", "cuda", "available", 0.0)]
        stats = torch.cuda.memory_stats(self.device)
        return [
            ("", "cuda", "available", 1.0),
            ("", "cuda", "allocated_bytes", float(stats.get("allocated_bytes.all.current", 0))),
            ("", "cuda", "peak_bytes", float(stats.get("allocated_bytes.all.peak", 0))),
        ]
