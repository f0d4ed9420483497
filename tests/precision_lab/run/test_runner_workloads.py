"""The runner trains any workload: nested inputs, integer ids kept integer, its own loss and
metric, and the built-in language model learning its task in the default suite's steps."""

from itertools import islice

import pytest
import torch
from torch import nn

from precision_lab.run import runner
from precision_lab.run.suite import RunPlan
from precision_lab.specs import parse_spec
from precision_lab.workloads.loader import _LOADED
from precision_lab.workloads.workload import Workload

CPU = torch.device("cpu")
SEEN: list[tuple[torch.dtype, torch.dtype]] = []


class _TokensAndFeatures(nn.Module):
    """Reads a dict of integer ids and floating features; records their dtypes."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.linear = nn.Linear(4 + 3, 2)

    def forward(self, ids, features):
        SEEN.append((ids.dtype, features.dtype))
        return self.linear(torch.cat([self.embed(ids), features], dim=1))


def _batches(seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, 7, (16,), generator=g)
        features = torch.randn(16, 3, generator=g)
        yield {"ids": ids, "features": features}, (ids % 2)


def _parity(model):
    inputs, labels = next(_batches(99))
    return float((model(**inputs).argmax(dim=1) == labels).float().mean())


def _plan(name, workload, monkeypatch, optimizer="singd:diagonal", **kw):
    monkeypatch.setitem(_LOADED, (f"mine:{name}", 64), workload)
    hyper = kw.pop("hyperparameters", {"lr": 0.03})
    return RunPlan(
        workload.name or name,
        "baseline",
        parse_spec(optimizer),
        kw.pop("dtype", torch.float32),
        kw.pop("mode", "pure"),
        0,
        kw.pop("steps", 30),
        64,
        hyper,
        source=f"mine:{name}",
    )


@pytest.mark.parametrize(("dtype", "mode"), [(torch.bfloat16, "pure"), (torch.float16, "mixed")])
def test_floating_inputs_take_the_runs_dtype_and_ids_stay_integer(dtype, mode, monkeypatch):
    workload = Workload(_TokensAndFeatures, _batches, metric=_parity, name="parity")
    SEEN.clear()
    out = runner.train(
        _plan("ids", workload, monkeypatch, dtype=dtype, mode=mode), device=CPU, every=10
    )
    s = out.summary
    assert s["finished"] and s["error"] is None, s["error"]
    training = SEEN[-s["steps"] - 1 : -1]  # before them: the check of the untrained metric
    expected = dtype if mode == "pure" else torch.float32
    assert set(training) == {(torch.int64, expected)}
    # The metric, written in float32, ran too: its inputs were cast the same way.
    assert SEEN[-1] == (torch.int64, expected)
    assert s["metric_name"] == "_parity" and 0 <= s["accuracy"] <= 1
    assert s["model"] == "parity" and s["run"].startswith("parity/baseline/")


def test_the_workloads_metric_and_chance_decide_learned(monkeypatch):
    learns = Workload(_TokensAndFeatures, _batches, metric=_parity, name="a", chance=0.6)
    s = runner.train(_plan("a", learns, monkeypatch), device=CPU, every=10).summary
    assert s["accuracy"] > 0.9 and s["learned"] is True
    impossible = Workload(_TokensAndFeatures, _batches, metric=_parity, name="b", chance=1.0)
    s = runner.train(_plan("b", impossible, monkeypatch), device=CPU, every=10).summary
    assert s["accuracy"] <= 1.0 and s["learned"] is False


def test_without_a_metric_the_loss_alone_decides(monkeypatch):
    workload = Workload(_TokensAndFeatures, _batches, name="nometric")
    s = runner.train(_plan("nometric", workload, monkeypatch), device=CPU, every=10).summary
    assert s["accuracy"] is None and s["metric_name"] is None
    assert s["learned"] is True and s["final_loss"] < 0.9 * 0.69


def test_a_custom_loss_on_tuple_inputs(monkeypatch):
    def regression_batches(seed):
        g = torch.Generator().manual_seed(seed)
        while True:
            x = torch.randn(32, 4, generator=g)
            yield (x,), x.sum(dim=1, keepdim=True)

    workload = Workload(
        lambda: nn.Linear(4, 1),
        regression_batches,
        loss=lambda out, y: ((out - y) ** 2).mean(),
        name="regression",
    )
    plan = _plan(
        "regression", workload, monkeypatch, optimizer="adamw", hyperparameters={"lr": 0.1}
    )
    out = runner.train(plan, device=CPU, every=10)
    loss = out.records.query("metric == 'loss'")["value"]
    assert out.summary["finished"] and out.summary["learned"]
    assert loss.iloc[-1] < 0.1 * loss.iloc[0]


def test_a_metric_that_fails_after_training_is_the_runs_error(monkeypatch):
    calls = []

    def flaky(model):  # fine on the untrained model (the suite's check), not after
        calls.append(1)
        return 0.5 if len(calls) == 1 else 2.0

    workload = Workload(_TokensAndFeatures, _batches, metric=flaky, name="flaky")
    s = runner.train(_plan("flaky", workload, monkeypatch), device=CPU, every=10).summary
    assert (
        s["error"] == "ValueError in the metric: metric flaky returned 2.0, not a number in [0, 1]"
    )
    assert not s["finished"] and s["accuracy"] is None


def test_batches_that_run_out_end_the_run(monkeypatch):
    workload = Workload(
        _TokensAndFeatures, lambda seed: list(islice(_batches(seed), 3)), name="short"
    )
    s = runner.train(_plan("short", workload, monkeypatch), device=CPU, every=10).summary
    assert s["finished"] and s["steps"] == 3


@pytest.mark.parametrize(
    ("optimizer", "lr"), [("singd:diagonal", 0.03), ("kfac:cholesky", 1e-3), ("adamw", 1e-2)]
)
def test_the_language_model_learns_its_task_in_the_default_suites_steps(optimizer, lr):
    """40 steps of 64 sequences, float32: every family far above chance (1/16 + 3 s.e.)."""
    torch.set_num_threads(1)
    plan = RunPlan(
        "lm", "baseline", parse_spec(optimizer), torch.float32, "pure", 0, 40, 64, {"lr": lr}
    )
    s = runner.train(plan, device=CPU, every=10).summary
    assert s["metric_name"] == "answer_accuracy"
    assert s["learned"] is True and s["accuracy"] > 0.4
    assert s["preconditioned_fraction"] == (
        None if optimizer == "adamw" else pytest.approx(0.986, abs=1e-3)
    )
