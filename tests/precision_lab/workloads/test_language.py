"""The causal language model and its copy task: causality, tying, the task's answers, and
real learning in float32 within the default suite's 40 steps."""

import pytest
import torch
from torch import nn

from precision_lab.workloads import language
from precision_lab.workloads.builtin import build_builtin, build_module
from precision_lab.workloads.workload import IGNORE_INDEX, cross_entropy


def test_copy_sequences_have_one_answer_per_copied_symbol():
    inputs, targets = language.copy_sequences(5, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (5, language.CONTEXT)
    assert inputs.dtype == targets.dtype == torch.int64
    answered = targets != IGNORE_INDEX
    assert answered.sum(dim=1).tolist() == [language.COPY_LENGTH] * 5
    assert (inputs[:, language.COPY_LENGTH] == language.SEPARATOR).all()
    # The answers are the symbols before the separator, in order.
    symbols = inputs[:, : language.COPY_LENGTH]
    assert torch.equal(targets[answered].reshape(5, -1), symbols)


def test_the_model_is_causal():
    model = language.CausalLM().eval()
    tokens = torch.randint(0, language.VOCAB, (2, language.CONTEXT))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % language.VOCAB
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert before.shape == (2, language.CONTEXT, language.VOCAB)
    assert torch.allclose(before[:, :7], after[:, :7], atol=1e-6)
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_weight_tying_is_optional():
    tied, untied = language.CausalLM(), language.CausalLM(tie_weights=False)
    assert tied.head.weight is tied.embed.weight
    assert untied.head.weight is not untied.embed.weight
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(untied) - count(tied) == language.VOCAB * 64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_model_runs_in_low_precision(dtype):
    model = language.CausalLM().to(dtype)
    inputs, targets = language.copy_sequences(3, torch.Generator().manual_seed(0))
    loss = cross_entropy(model(inputs), targets)
    assert loss.dtype == dtype and torch.isfinite(loss)


def test_it_learns_the_copy_task_in_forty_steps():
    """AdamW, batch 64, 40 steps (the default suite's): far above chance (1/16)."""
    torch.set_num_threads(1)  # small matrices: threads only contend (the fixture restores it)
    workload = build_builtin("lm", 64)
    model = build_module(workload, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = workload.metric(model)
    for _, (inputs, targets) in zip(range(40), workload.batches(0), strict=False):
        optimizer.zero_grad()
        workload.compute_loss(model(inputs), targets).backward()
        optimizer.step()
    with torch.no_grad():
        after = workload.metric(model.eval())
    assert before < workload.chance < 0.5 < after


def test_the_metric_reads_held_out_sequences():
    inputs, _ = language.copy_sequences(4, torch.Generator().manual_seed(language.TEST_SEED))
    train, _ = next(language.copy_batches(4, 0))
    assert not torch.equal(inputs, train)
    constant = nn.Module()
    constant.weight = nn.Parameter(torch.zeros(1))
    constant.forward = lambda tokens: torch.zeros(*tokens.shape, language.VOCAB)
    # Always answering symbol 0 is right about 1 time in 16.
    assert language.answer_accuracy(constant) == pytest.approx(1 / language.SYMBOLS, abs=0.02)
