"""A HuggingFace transformers model, built from a config (nothing is downloaded).

Run it with (transformers installed: ``pip install transformers``):

    precision-lab stress --models examples/huggingface_gpt2.py:build --dtype bf16

A two-layer GPT-2 (``GPT2LMHeadModel``, width 64, tied embeddings) learns to repeat a
sequence of 6 random symbols after a separator. Its attention and MLP projections are
GPT-2's ``Conv1D`` layers (linear layers with a transposed weight), which SINGD and KFAC
precondition; the embeddings and LayerNorms go to the fallback optimizer. Inputs are a
dict, ``{"input_ids": int64 (batch, 12)}``, passed as keyword arguments; the loss reads
the logits of the model's output. The metric is the next-token accuracy on the repeated
symbols of 512 held-out sequences (chance: 1/16).
"""

import torch
import torch.nn.functional as F

import precision_lab

SYMBOLS, LENGTH, BATCH = 16, 6, 64
SEPARATOR = SYMBOLS
IGNORE = -100  # a position whose next token has no right answer


def sequences(count: int, generator: torch.Generator) -> tuple[dict, torch.Tensor]:
    symbols = torch.randint(0, SYMBOLS, (count, LENGTH), generator=generator)
    tokens = torch.cat([symbols, torch.full((count, 1), SEPARATOR), symbols], dim=1)
    targets = tokens[:, 1:].clone()
    targets[:, :LENGTH] = IGNORE  # the random symbols themselves cannot be predicted
    return {"input_ids": tokens[:, :-1]}, targets


def batches(seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield sequences(BATCH, generator)


def loss(outputs, targets: torch.Tensor) -> torch.Tensor:
    logits = outputs.logits
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def answer_accuracy(model) -> float:
    inputs, targets = sequences(512, torch.Generator().manual_seed(12345))
    predicted = model(**inputs).logits.argmax(dim=-1)
    answered = targets != IGNORE
    return float((predicted[answered] == targets[answered]).float().mean())


def build() -> precision_lab.Workload:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise ImportError(
            "this example needs HuggingFace transformers, not installed here: "
            "pip install transformers"
        ) from None
    config = GPT2Config(
        vocab_size=SYMBOLS + 1,
        n_positions=2 * LENGTH,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return precision_lab.Workload(
        model=lambda: GPT2LMHeadModel(config),
        batches=batches,
        loss=loss,
        metric=answer_accuracy,
        name="hf-gpt2",
        chance=precision_lab.chance_accuracy(SYMBOLS, 512 * LENGTH),
    )
