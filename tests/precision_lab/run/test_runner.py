"""One run, really trained: learning, divergence, modes, interruption and crashes."""

import datetime
import math
import subprocess
import sys

import pytest
import torch

from precision_lab.run import runner
from precision_lab.run.suite import RunPlan
from precision_lab.run.summary import MEMORY_STEPS
from precision_lab.specs import parse_spec
from precision_lab.workloads.builtin import digits_workload
from precision_lab.workloads.data import digits
from precision_lab.workloads.loader import _LOADED
from precision_lab.workloads.models import build_model

CPU = torch.device("cpu")


def plan(optimizer="adamw", dtype=torch.float32, mode="pure", steps=5, **kw):
    hyper = kw.pop("hyperparameters", {})
    return RunPlan(
        kw.pop("model", "mlp"),
        kw.pop("scenario", "baseline"),
        parse_spec(optimizer),
        dtype,
        mode,
        kw.pop("seed", 0),
        steps,
        64,
        hyper,
        **kw,
    )


def test_adamw_learns_the_digits():
    """Real learning: 80 steps of AdamW on the MLP, far above chance (0.1)."""
    out = runner.train(plan(steps=80, hyperparameters={"lr": 1e-2}), device=CPU, every=40)
    s = out.summary
    assert s["finished"] and not s["diverged"] and s["steps"] == 80
    assert s["accuracy"] > 0.85
    loss = out.records.query("probe == 'train' and metric == 'loss'")
    assert list(loss["step"]) == list(range(80))
    assert loss["value"].iloc[-10:].mean() < 0.5 * loss["value"].iloc[0]
    accuracy = out.records.query("metric == 'test_accuracy'")["value"]
    assert list(accuracy) == [s["accuracy"]]


def test_singd_trains_every_transformer_parameter():
    """LayerNorm, Embedding and attention weights move too: SINGD's fallback trains them."""
    p = plan("singd:diagonal", model="transformer", steps=2, hyperparameters={"lr": 0.03})
    out = runner.train(p, device=CPU, every=1)
    assert out.summary["fallback_optimizer"] == "AdamW"
    assert out.summary["finished"] and out.summary["error"] is None
    moved = out.records.query("tensor == 'update' and metric == 'amax' and step == 0")
    names = {n for n, _ in build_model("transformer", 0).named_parameters()}
    assert set(moved["module"]) == names
    assert (moved["value"] > 0).all()
    for fallback in ("position.weight", "blocks.0.norm1.weight", "blocks.0.attn.in_proj_weight"):
        assert fallback in names
    # Those fallback layers show in the coverage: part of the parameters only.
    assert 0 < out.summary["preconditioned_fraction"] < 1
    by_type = out.summary["coverage"]["by_type"]
    assert by_type["LayerNorm"]["fallback_elements"] > 0
    assert by_type["LayerNorm"]["preconditioned_elements"] == 0


class _Tiny(torch.nn.Module):
    """Embedding(5, 3) -> Linear(3, 4) -> LayerNorm(4): 15 + 16 + 8 = 39 elements, of
    which only the Linear's 3 * 4 + 4 = 16 are Kronecker-factored."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.linear = torch.nn.Linear(3, 4)
        self.norm = torch.nn.LayerNorm(4)

    def forward(self, tokens):
        return self.norm(self.linear(self.embed(tokens)))


@pytest.mark.parametrize("optimizer", ["singd:diagonal", "kfac:cholesky"])
def test_coverage_counts_embedding_and_layernorm_as_fallback(optimizer):
    torch.manual_seed(0)
    model = _Tiny()
    opt = parse_spec(optimizer).build(model, {})
    tokens, targets = torch.randint(5, (8,)), torch.randint(4, (8,))
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(tokens), targets).backward()
    opt.step()
    figures = runner._coverage(opt)
    assert figures["preconditioned_fraction"] == pytest.approx(16 / 39)
    by_type = figures["coverage"]["by_type"]
    assert by_type["Linear"]["preconditioned_elements"] == 16
    assert by_type["Linear"]["fallback_elements"] == 0
    assert by_type["Embedding"]["fallback_elements"] == 15
    assert by_type["LayerNorm"]["fallback_elements"] == 8
    assert by_type["LayerNorm"]["fallback_tensors"] == 2
    assert figures["coverage"]["total"]["elements"] == 39


def test_first_order_optimizers_have_no_coverage():
    for name in ("adamw", "sgd"):
        opt = parse_spec(name).build(_Tiny(), {})
        assert runner._coverage(opt) == {"preconditioned_fraction": None, "coverage": None}


def test_divergence_stops_the_run_and_is_recorded():
    p = plan("sgd", dtype=torch.float16, steps=20, hyperparameters={"lr": 1e4})
    s = runner.train(p, device=CPU, every=10).summary
    assert s["diverged"] and s["finished"]
    assert s["steps"] < 20  # stopped early
    assert s["first_nonfinite_step"] is not None and s["first_nonfinite_step"] <= s["steps"]
    assert not math.isfinite(s["final_loss"])


def test_loss_ten_times_its_first_value_is_divergence():
    p = plan("sgd", steps=20, hyperparameters={"lr": 1e3})
    out = runner.train(p, device=CPU, every=10)
    loss = out.records.query("metric == 'loss'")["value"].tolist()
    assert out.summary["diverged"]
    assert loss[-1] > runner.DIVERGENCE_FACTOR * loss[0]
    assert all(v <= runner.DIVERGENCE_FACTOR * loss[0] for v in loss[:-1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pure_mode_keeps_adamw_state_in_the_dtype(dtype):
    """Optimizer state bytes: AdamW's two moments per parameter in the dtype + a float32
    step counter per tensor."""
    s = runner.train(plan(dtype=dtype, steps=2), device=CPU, every=10).summary
    model = build_model("mlp", 0)
    n = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    assert s["optimizer_state_bytes"] == 2 * n * 2 + 4 * tensors
    assert s["dtype"] == str(dtype).removeprefix("torch.")


def test_mixed_float16_uses_a_grad_scaler_and_keeps_float32_state():
    p = plan(dtype=torch.float16, mode="mixed", steps=4, scenario="loss_scale=6.10352e-05")
    out = runner.train(p, device=CPU, every=10)
    scale = out.records.query("metric == 'grad_scale'")["value"]
    assert len(scale) == 4 and (scale > 1).all()
    model = build_model("mlp", 0)
    n = sum(p.numel() for p in model.parameters())
    assert out.summary["optimizer_state_bytes"] == 2 * n * 4 + 4 * len(list(model.parameters()))
    assert out.summary["mode"] == "mixed"


class _Interrupting:
    """Batches that raise ``exc`` when batch number ``at`` is drawn."""

    def __init__(self, data, at, exc):
        self.data, self.at, self.exc = data, at, exc

    def __getattr__(self, name):
        return getattr(self.data, name)

    def batches(self, batch_size, seed):
        for i, batch in enumerate(self.data.batches(batch_size, seed)):
            if i == self.at:
                raise self.exc
            yield batch


@pytest.mark.parametrize(
    ("exc", "finished", "interrupted"),
    [(KeyboardInterrupt(), False, True), (RuntimeError("disk on fire"), False, False)],
)
def test_interruption_and_crash_keep_what_was_recorded(monkeypatch, exc, finished, interrupted):
    interrupting = digits_workload("mlp", 64, _Interrupting(digits(), 3, exc))
    monkeypatch.setitem(_LOADED, ("mlp", 64), interrupting)
    out = runner.train(plan(steps=10), device=CPU, every=10)
    assert out.interrupted is interrupted
    assert out.summary["finished"] is finished
    assert out.summary["steps"] == 3
    assert out.records.query("metric == 'loss'")["step"].tolist() == [0, 1, 2]
    if interrupted:
        assert out.summary["error"] is None
    else:
        assert out.summary["error"] == "RuntimeError: disk on fire"


def test_warnings_are_recorded_not_printed(recwarn):
    p = plan("singd:diagonal", model="transformer", steps=1)
    s = runner.train(p, device=CPU, every=10).summary
    assert any("fallback" in w for w in s["warnings"])
    assert not recwarn.list


def test_failing_ranks_read_each_others_errors_from_the_store():
    """The exchange behind `RankFailedError` on a real c10d store: the rank that fails
    second names the first one's error before its own; the first, finding nothing, keeps
    its own; a run id keeps runs apart."""
    store = torch.distributed.HashStore()
    assert runner._exchange_errors(store, "a", 1, 2, "ValueError: first") == []
    assert runner._exchange_errors(store, "b", 0, 2, "other run") == []
    assert runner._exchange_errors(store, "a", 0, 2, "RuntimeError: closed") == [
        "rank 1: ValueError: first"
    ]


STORE_HOST = """
import sys, time
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
print(store.port, flush=True)
time.sleep(120)
"""


def test_an_unreachable_store_leaves_each_rank_its_own_error():
    """A store whose host process is gone (killed here, as torchrun's agent or rank 0
    can be) raises on use; the exchange gives up and the rank reports its own error."""
    host = subprocess.Popen([sys.executable, "-c", STORE_HOST], stdout=subprocess.PIPE, text=True)
    try:
        port = int(host.stdout.readline())
        client = torch.distributed.TCPStore(
            "127.0.0.1", port, 2, is_master=False, timeout=datetime.timedelta(seconds=5)
        )
        assert runner._exchange_errors(client, "a", 1, 2, "first") == []
    finally:
        host.kill()
        host.wait()
    assert runner._exchange_errors(client, "a", 0, 2, "mine") == []
    with pytest.raises(RuntimeError):  # what the exchange survived
        client.check(["precision-lab/failed/a/rank1"])
    assert runner._exchange_errors(None, "a", 0, 2, "mine") == []


def test_reproducers_land_where_the_caller_says_never_where_the_plan_says(tmp_path):
    """A plan whose hyperparameters name a failure_dir (a suite file's, say) cannot send
    KFAC's reproducers there: input_scale=16384 in float16 makes A overflow and its Cholesky
    fail, and the reproducer is written under the caller's failure_dir only."""
    elsewhere = tmp_path / "elsewhere"
    bad = plan(
        "kfac:cholesky",
        dtype=torch.float16,
        steps=2,
        scenario="input_scale=16384",
        hyperparameters={"failure_dir": str(elsewhere)},
    )
    runner.train(bad, device=CPU, every=1, failure_dir=tmp_path / "failures")
    assert not elsewhere.exists()
    assert list((tmp_path / "failures").rglob("*.pt"))


@pytest.mark.parametrize("optimizer", ["singd:dense", "kfac:cholesky", "adamw"])
def test_peak_tensor_bytes_counts_training_and_not_the_probes_readings(optimizer):
    """The figure holds the optimizer's state and the gradients at once (both live after a
    backward), and the probes' own readings (float64 copies of every factor and state
    tensor at their cadence, here every step) are not in it."""
    every_step = runner.train(plan(optimizer, steps=4), device=CPU, every=1).summary
    rarely = runner.train(plan(optimizer, steps=4), device=CPU, every=1000).summary
    model = build_model("mlp", 0)
    grads = sum(p.numel() * 4 for p in model.parameters())
    figure = rarely["peak_tensor_bytes"]
    assert figure >= rarely["optimizer_state_bytes"] + grads
    assert abs(every_step["peak_tensor_bytes"] - figure) <= 1024


def test_peak_tensor_bytes_follows_the_dtype_and_is_null_for_a_run_that_ended_early():
    fp32 = runner.train(plan("adamw", steps=4), device=CPU, every=10).summary
    bf16 = runner.train(plan("adamw", torch.bfloat16, steps=4), device=CPU, every=10).summary
    assert 0 < bf16["peak_tensor_bytes"] < 0.6 * fp32["peak_tensor_bytes"]
    diverged = runner.train(
        plan("sgd", steps=20, hyperparameters={"lr": 1e4}), device=CPU, every=10
    ).summary
    assert diverged["diverged"] and diverged["steps"] < MEMORY_STEPS
    assert diverged["peak_tensor_bytes"] is None
