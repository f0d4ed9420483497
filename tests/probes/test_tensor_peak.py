"""Peak live tensor bytes from the CPU allocator's events, against sizes known in advance."""

import subprocess
import sys

import torch

from probes.tensor_peak import TensorPeak, peak_of


def test_peak_of_is_the_largest_running_sum_in_time_order():
    assert peak_of([(3, -40), (1, 100), (2, 60), (4, 10)]) == 160
    assert peak_of([(1, -8)]) == 0
    assert peak_of([]) == 0


def test_the_peak_of_known_allocations_is_exact():
    """Two live buffers (4,000 and 8,000 bytes), one freed, then a smaller one: the peak is
    the first two together; tensors that were live before the block do not count."""
    before = torch.ones(10_000)  # live before: not the block's
    with TensorPeak() as peak:
        a = torch.empty(1_000, dtype=torch.float32)
        b = torch.empty(1_000, dtype=torch.float64)
        del b
        c = torch.empty(500, dtype=torch.float32)
    assert peak.peak_bytes == 12_000
    assert a.numel() + c.numel() + before.numel() > 0  # kept alive through the block


def test_a_temporary_inside_an_operation_counts():
    """``(x * 2).sum()`` holds the product (x's size) until the sum has run: the peak
    includes it although nothing the block keeps is that large."""
    x = torch.randn(25_000, dtype=torch.float64)  # 200,000 bytes
    with TensorPeak() as peak:
        total = (x * 2).sum()
    assert 200_000 <= peak.peak_bytes < 200_000 + 4_096
    assert torch.isfinite(total)


def test_a_mark_measures_from_there_and_sees_frees_of_blocks_made_after_start():
    """A buffer made before the mark and freed after it lowers the live bytes after the
    mark: replacing a 40,000-byte state by a new one of the same size peaks at the new
    one's size above the old (both live at once), not twice it."""
    peak = TensorPeak()
    peak.start()
    state = torch.empty(10_000)  # made inside the profile, before the mark
    peak.mark()
    new = torch.empty(10_000)
    del state
    state = new
    scratch = torch.empty(1_000)  # 4,000 bytes after the old state is gone
    del scratch
    peak.stop()
    assert peak.peak_bytes == 40_000
    assert state.numel() == 10_000


def test_a_block_that_raises_has_no_peak():
    peak = TensorPeak()
    try:
        with peak:
            torch.empty(100)
            raise RuntimeError("stop")
    except RuntimeError:
        pass
    assert peak.peak_bytes is None


def test_the_profilers_own_lines_stay_off_stderr():
    """Some torch builds print ``USDT ... profiler_start`` at each start and stop: a progress
    bar over stderr would be broken by them. What the program itself prints stays."""
    code = (
        "import sys, torch\n"
        "from probes.tensor_peak import TensorPeak\n"
        "for _ in range(2):\n"
        "    with TensorPeak() as p:\n"
        "        torch.ones(10)\n"
        "print('after', file=sys.stderr)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "profiler_start" not in out.stderr and "profiler_stop" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == "after"
