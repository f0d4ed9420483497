"""`probes.tensor_memory.TensorPeak`: live tensor bytes counted per operation on the CPU,
checked against hand-counted allocations, the optimizers' own state and the PyTorch
profiler's allocator events."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from probes.tensor_memory import TensorPeak, not_counted
from singd import KFAC, SINGD

F32 = 4


def test_peak_and_live_bytes_of_a_known_sequence():
    """Allocations and frees in a known order; views, in-place results, out= arguments and
    tensors made before the stretch add nothing."""
    before = torch.zeros(10_000)
    with TensorPeak() as meter:
        a = torch.empty(1000)  # 4000 live
        b = torch.empty(2000)  # 12000
        del a  # 8000
        c = torch.ones(4000)  # 24000: the peak
        c.add_(1)
        view = c[10:].view(-1, 10)
        torch.add(c, 1, out=c)
        before.mul_(2)
        alias = before[:5]
        del b, view, alias  # 16000
    assert meter.peak_bytes == (2000 + 4000) * F32
    assert meter.live_bytes == 4000 * F32
    del c  # freed after the stretch: the figures stay as they were
    assert meter.live_bytes == 4000 * F32


def test_an_out_argument_that_grows_counts_its_growth():
    with TensorPeak() as meter:
        out = torch.empty(0)
        torch.add(torch.ones(100), 1, out=out)  # the ones (freed) and out's 100 entries
    assert meter.live_bytes == 100 * F32
    assert meter.peak_bytes == 200 * F32


def test_not_counted_blocks_are_left_out():
    with TensorPeak() as meter:
        kept = torch.empty(500)
        with not_counted():
            probe_copy = kept.to(torch.float64)  # 4000 bytes the meter never sees
        del probe_copy
    assert meter.peak_bytes == meter.live_bytes == 500 * F32


def test_tensors_made_before_the_stretch_and_freed_in_it_are_not_subtracted():
    old = torch.empty(10_000)
    with TensorPeak() as meter:
        del old
        new = torch.empty(100)
    assert meter.peak_bytes == meter.live_bytes == 100 * F32
    del new


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    return model, torch.randn(16, 32), torch.randint(10, (16,))


def _steps(model, optimizer, x, y, n):
    for _ in range(n):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=1e-3),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_what_lives_after_the_steps_is_the_optimizers_state(make):
    """After steps ending with zero_grad(set_to_none=True), what the steps made and still
    holds is exactly torch's optimizer state (momentum; AdamW's moments and step counts)."""
    model, x, y = _mlp()
    with TensorPeak() as meter:
        optimizer = make(model.parameters())
        _steps(model, optimizer, x, y, 3)
        optimizer.zero_grad(set_to_none=True)
    gc.collect()
    state = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for entry in optimizer.state.values()
        for t in entry.values()
        if torch.is_tensor(t)
    }
    assert meter.live_bytes == sum(state.values()) > 0
    grads = sum(p.numel() * F32 for p in model.parameters())
    assert meter.peak_bytes >= meter.live_bytes + grads


def _profiled_peak(prof) -> tuple[int, int]:
    """Peak and final live bytes from the profiler's raw allocator events."""
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is None:
        pytest.skip("this torch build's profiler exposes no raw allocator events")
    changes = sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak, live


@pytest.mark.parametrize(
    "make",
    [
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, foreach=False),
        lambda m: SINGD(m, structures=("dense", "dense")),
        lambda m: SINGD(m, structures=("hierarchical3_3", "diagonal"), T=2),
        lambda m: KFAC(m),
    ],
    ids=["sgd", "singd-dense", "singd-hierarchical", "kfac"],
)
def test_the_peak_equals_the_profilers_allocator_events(make):
    """The profiler, asked for memory, logs every allocation and free of the CPU
    allocator with its size: an independent count of the same thing. Over the
    optimizer's construction and three steps the two peaks and final figures agree to
    the byte."""
    from torch.profiler import ProfilerActivity, profile

    model, x, y = _mlp()
    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with profiler as prof, TensorPeak() as meter:
        optimizer = make(model)
        _steps(model, optimizer, x, y, 3)
    peak, live = _profiled_peak(prof)
    assert (meter.peak_bytes, meter.live_bytes) == (peak, live)
    assert meter.peak_bytes > 0


def test_the_figure_does_not_depend_on_the_thread_count():
    figures = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            model, x, y = _mlp()
            with TensorPeak() as meter:
                _steps(model, SINGD(model, structures=("dense", "diagonal")), x, y, 3)
            figures.append((meter.peak_bytes, meter.live_bytes))
    finally:
        torch.set_num_threads(threads)
    assert figures[0] == figures[1]


def test_the_probes_own_readings_are_not_counted():
    """A probed loop with every cadence due at every step (float64 copies of each factor
    for condition numbers and what-if readings) has the unprobed loop's figure, up to
    the per-step flags: the copies would add more than the factors' own bytes."""
    import probes

    def peak(probed: bool) -> int:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
        x, y = torch.randn(4, 256), torch.randint(256, (4,))
        optimizer = SINGD(model, structures=("dense", "dense"))
        with TensorPeak() as meter:
            if probed:
                with not_counted():
                    session = probes.attach(
                        model, optimizer, probes=[*probes.PROBES, "whatif"], every=1
                    )
            _steps(model, optimizer, x, y, 3)
            if probed:
                session.detach()
        return meter.peak_bytes

    bare, probed = peak(False), peak(True)
    factors = 2 * (257 * 257 + 256 * 256) * F32
    assert bare > factors
    assert abs(probed - bare) <= 4096
