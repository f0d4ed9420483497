"""What activation checkpointing saves with SINGD, KFAC and AdamW: peak tensor memory.

Workload: four transformer MLP blocks (1024-4096-1024, GELU, residual) and a head,
2048 rows, float32, each block checkpointed (``torch.utils.checkpoint``, non-reentrant)
or not; one curvature-update step (T=1) after a warm-up step. The figure is the peak of
live tensor bytes within the step, from the PyTorch profiler's memory events (every
allocation and free of the CPU allocator, exact; RSS would not do: glibc keeps freed
pages). Kronecker-factored optimizers need each layer's input and output gradient on
update steps; where the input's statistic is small (diagonal factors here; KFAC's dense
A over 2048 rows is not: 1025^2 entries against 2048 x 1024) it is taken in the forward
pass and the input is not kept, so checkpointing saves what it saves for AdamW.
Run: ``pytest benchmarks/test_checkpoint_memory.py -s``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint

from singd import KFAC, SINGD

ROWS, WIDTH, HIDDEN, BLOCKS = 2048, 1024, 4096, 4


class Blocks(nn.Module):
    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, WIDTH))
            for _ in range(BLOCKS)
        )
        self.head = nn.Linear(WIDTH, 10)
        self.checkpointed = checkpointed

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = h + (checkpoint(block, h, use_reentrant=False) if self.checkpointed else block(h))
        return self.head(h)


OPTIMIZERS = {
    "adamw": lambda model: torch.optim.AdamW(model.parameters()),
    "singd:diagonal": lambda model: SINGD(model, T=1, structures=("diagonal", "diagonal")),
    "kfac": lambda model: KFAC(model, T=1),
}


def peak_step_bytes(optimizer: str, checkpointed: bool) -> int:
    """Peak live tensor bytes during one training step (above what was live before it)."""
    torch.manual_seed(0)
    model = Blocks(checkpointed)
    opt = OPTIMIZERS[optimizer](model)
    x, y = torch.randn(ROWS, WIDTH), torch.randint(0, 10, (ROWS,))

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # optimizer state exists before the measured step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage != 0),
        key=lambda e: e.time_range.start,
    )
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_checkpointing_saves_for_kronecker_optimizers_what_it_saves_for_adamw(benchmark, optimizer):
    figures = {}

    def measure() -> None:
        figures["plain"] = peak_step_bytes(optimizer, False)
        figures["checkpointed"] = peak_step_bytes(optimizer, True)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    adamw_checkpointed = (
        figures["checkpointed"] if optimizer == "adamw" else peak_step_bytes("adamw", True)
    )
    saved = 1 - figures["checkpointed"] / figures["plain"]
    benchmark.extra_info.update(
        {f"peak_{k}_MiB": v / 2**20 for k, v in figures.items()}
        | {"saved": saved, "adamw_checkpointed_MiB": adamw_checkpointed / 2**20}
    )
    print(
        f"\n{optimizer}: peak {figures['plain'] / 2**20:.0f} MiB plain, "
        f"{figures['checkpointed'] / 2**20:.0f} MiB checkpointed ({saved:.0%} saved; "
        f"AdamW checkpointed {adamw_checkpointed / 2**20:.0f} MiB)"
    )
    if optimizer != "kfac":
        # The inputs inside a block are not kept: checkpointed, the step's peak is
        # AdamW's (its state is allocated before the step), within 5%.
        assert figures["checkpointed"] <= 1.05 * adamw_checkpointed
