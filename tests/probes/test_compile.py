"""Probes on a ``torch.compile``d model: the hooks run eagerly beside the compiled graphs
(dynamo does not trace them), so the readings are those of the eager model and a NaN is
still traced to its origin; compiling warns of nothing in the probes."""

import math
import warnings

import pandas as pd
import pytest
import torch
from torch import nn

import probes
from singd import SINGD
from tests.probes.test_first_nonfinite import Poison

KEY = ["step", "module", "tensor", "phase", "metric"]


def _run(compiled: bool, poison_step: int | None = None, steps: int = 4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), Poison(), nn.Tanh(), nn.Linear(8, 3))
    optimizer = SINGD(model, lr=0.1, lr_cov=0.1, T=1, structures=("diagonal", "dense"))
    forward = torch.compile(model, backend="aot_eager") if compiled else model
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=generator)
    y = torch.randint(0, 3, (16,), generator=generator)
    with probes.attach(model, optimizer, every=2, probes=["numerics"]) as session:
        for step in range(steps):
            model[1].forward_value = math.nan if step == poison_step else None
            optimizer.zero_grad()
            nn.functional.cross_entropy(forward(x), y).backward()
            optimizer.step()
    return session


@pytest.mark.slow
def test_compiled_model_gives_the_eager_readings_without_warnings(caplog):
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = _run(True)
    # Traced, the hooks made dynamo warn (functools.lru_cache in probes/flags.py) and log
    # graph breaks (Tensor.item() in probes/stats.py).
    said = [str(w.message) + w.filename for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [text for text in said if "probes" in text or "lru_cache" in text], said
    eager = _run(False)
    a = eager.to_frame().sort_values(KEY, ignore_index=True)
    b = compiled.to_frame().sort_values(KEY, ignore_index=True)
    assert len(a) and (a["tensor"] == "output_grad").any()
    pd.testing.assert_frame_equal(b[KEY], a[KEY])
    torch.testing.assert_close(
        torch.tensor(b["value"].to_numpy()), torch.tensor(a["value"].to_numpy()), rtol=1e-5, atol=0
    )


@pytest.mark.slow
def test_a_nan_in_a_compiled_model_is_traced_to_its_origin():
    torch._dynamo.reset()
    session = _run(True, poison_step=2)
    assert session.first_nonfinite() == probes.NonFinite(2, "1", "activation", "forward")
