"""NVML device matching by UUID (MIG-aware) and the rows without a GPU or NVML.

NVML cannot run on a machine without an NVIDIA driver, so the UUID search is checked
against a stand-in NVML with two GPUs, the second in MIG mode; the real library is
exercised by tests/probes/test_cuda.py through scripts/gpu-check.sh.
"""

from types import SimpleNamespace

import pytest
import torch

from probes.device_memory import CudaAllocator, NvmlDevice


class _Error(Exception):
    pass


def _nvml():
    gpus = {
        0: {"uuid": "GPU-aaaa-0000", "mig": None},
        1: {"uuid": b"GPU-bbbb-1111", "mig": ["MIG-cccc-2222", None, "MIG-dddd-3333"]},
    }

    def mig_handle(handle, slot):
        instance = gpus[handle]["mig"][slot]
        if instance is None:
            raise _Error("no instance in this slot")
        return ("mig", instance)

    def uuid(handle):
        return handle[1] if isinstance(handle, tuple) else gpus[handle]["uuid"]

    def mig_mode(handle):
        if gpus[handle]["mig"] is None:
            raise _Error("MIG not supported")
        return (1, 1)

    return SimpleNamespace(
        NVMLError=_Error,
        NVML_DEVICE_MIG_ENABLE=1,
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUUID=uuid,
        nvmlDeviceGetMigMode=mig_mode,
        nvmlDeviceGetMaxMigDeviceCount=lambda handle: len(gpus[handle]["mig"]),
        nvmlDeviceGetMigDeviceHandleByIndex=mig_handle,
    )


def _searcher() -> NvmlDevice:
    device = NvmlDevice(None)
    device._nvml = _nvml()
    return device


@pytest.mark.parametrize(
    ("torch_uuid", "handle", "is_mig"),
    [
        ("aaaa-0000", 0, False),  # torch prints the UUID without the GPU- prefix
        ("GPU-bbbb-1111", 1, False),  # NVML may return bytes
        ("MIG-dddd-3333", ("mig", "MIG-dddd-3333"), True),  # past an empty MIG slot
        ("eeee-4444", None, False),
    ],
)
def test_uuid_search_finds_gpus_and_mig_instances(torch_uuid, handle, is_mig):
    found = _searcher()._find(torch_uuid.lower().removeprefix("gpu-").removeprefix("mig-"))
    assert found == (handle, is_mig)


def test_without_gpu_or_nvml_one_row_says_not_available():
    nvml = NvmlDevice(torch.device("cpu")).rows()
    assert nvml == [("no CUDA device in use", "nvml", "available", 0.0)]
    assert CudaAllocator(torch.device("cpu")).rows() == [
        ("no CUDA device in use", "cuda", "available", 0.0)
    ]
    assert CudaAllocator(None).peak() is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_nvml_library_missing_is_a_row_not_an_error():
    rows = NvmlDevice(torch.device("cuda")).rows()
    assert len(rows) == 1 and rows[0][1:] == ("nvml", "available", 0.0)
    assert "NVML not available" in rows[0][0]
