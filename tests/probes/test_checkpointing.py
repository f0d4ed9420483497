"""Probes over activation checkpointing (``torch.utils.checkpoint``, reentrant or not):
the recomputation in the backward pass is not a second forward, so every reading is
taken once, as without checkpointing, and a NaN is still traced to where it was born."""

import math

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import probes
from singd import SINGD
from tests.probes.test_first_nonfinite import Poison


class Checkpointed(nn.Module):
    """Linear-Poison-Tanh-Linear-Tanh in a checkpointed segment, then a Linear head."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Linear(6, 8), Poison(), nn.Tanh(), nn.Linear(8, 8), nn.Tanh()
        ).double()
        self.head = nn.Linear(8, 3).double()
        self.reentrant = reentrant

    def forward(self, x):
        if self.reentrant is None:
            return self.head(self.body(x))
        return self.head(checkpoint(self.body, x, use_reentrant=self.reentrant))


def _run(reentrant, steps=4, poison_step=None, backward=False):
    model = Checkpointed(reentrant)
    optimizer = SINGD(model, lr=0.1, lr_cov=0.1, T=1, structures=("dense", "diagonal"))
    generator = torch.Generator().manual_seed(1)
    # A reentrant checkpoint gives its segment gradients only if an input requires one.
    x = torch.randn(16, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (16,), generator=generator)
    with probes.attach(model, optimizer, every=1, probes=["numerics"]) as session:
        for step in range(steps):
            value = math.nan if step == poison_step else None
            model.body[1].backward_value = value if backward else None
            model.body[1].forward_value = None if backward else value
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return session


KEY = ["step", "module", "tensor", "phase", "metric"]


@pytest.mark.parametrize("reentrant", [False, True])
def test_every_reading_is_taken_once_as_without_checkpointing(reentrant):
    """The same rows and the same values (float64, the recomputation is exact), where
    the recomputed forward used to add a second reading of each activation."""
    plain = _run(None).to_frame().sort_values(KEY, ignore_index=True)
    checkpointed = _run(reentrant).to_frame().sort_values(KEY, ignore_index=True)
    assert (plain["tensor"] == "activation").any() and (plain["tensor"] == "output_grad").any()
    pd.testing.assert_frame_equal(checkpointed[KEY], plain[KEY])
    torch.testing.assert_close(
        torch.tensor(checkpointed["value"].to_numpy()),
        torch.tensor(plain["value"].to_numpy()),
        rtol=1e-12,
        atol=0.0,
        equal_nan=True,
    )


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize(
    ("backward", "origin"),
    [(False, ("body.1", "activation", "forward")), (True, ("body.0", "output_grad", "backward"))],
)
def test_a_nan_inside_a_checkpointed_segment_is_traced_to_its_origin(reentrant, backward, origin):
    session = _run(reentrant, poison_step=2, backward=backward)
    assert session.first_nonfinite() == probes.NonFinite(2, *origin)
    assert (
        session.summary()["nan_events"]
        == _run(None, poison_step=2, backward=backward).summary()["nan_events"]
    )
