"""KFAC on a CUDA device agrees with the CPU; reproducers saved there replay anywhere.

Skipped without CUDA (tests/conftest.py). On a GPU, float16 Newton-Schulz runs at speed,
so it is checked at width 512 (on this CPU the same check took 2.3 s and gave a
relative error of 0.010 against the bound 0.088; the CUDA tests were not run here).
"""

import pytest
import torch
from torch import nn

from singd import KFAC
from singd.optim.inverses import INVERSE_METHODS, invert_or_keep, newton_schulz, replay

pytestmark = pytest.mark.cuda


def trained(device: str, method: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4)).to(device)
    opt = KFAC(model, lr=0.1, damping=1e-2, T=1, inverse_method=method)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(32, 20, generator=gen).to(device)
        y = torch.randint(0, 4, (32,), generator=gen).to(device)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize("method", INVERSE_METHODS)
def test_cuda_training_matches_the_cpu_in_float32(method):
    for cpu, cuda in zip(trained("cpu", method), trained("cuda", method), strict=True):
        torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-5)


def test_float16_newton_schulz_on_cuda_is_accurate_to_float16():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(512, 512, generator=gen, dtype=torch.float64))
    matrix = (q * torch.linspace(1.0, 0.25, 512, dtype=torch.float64)) @ q.T
    result = newton_schulz(matrix.to(device="cuda", dtype=torch.float16))
    expected = torch.linalg.inv(matrix.to(torch.float16).double())
    rel = (result.double().cpu() - expected).abs().max() / expected.abs().max()
    assert rel <= 4.0 * torch.finfo(torch.float16).eps * 512**0.5


def test_a_reproducer_saved_on_cuda_records_its_device_and_replays(tmp_path):
    bad = torch.diag(torch.tensor([1.0, -1.0], device="cuda"))
    invert_or_keep(bad, None, "cholesky", failure_dir=tmp_path, tag="gpu")
    record = torch.load(tmp_path / "gpu.cholesky.pt", weights_only=True)
    assert record["device"].startswith("cuda") and record["matrix"].device.type == "cpu"
    assert replay(tmp_path / "gpu.cholesky.pt")[1] is not None
