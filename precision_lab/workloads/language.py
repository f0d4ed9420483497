"""A decoder-only causal language model and a synthetic task with a right answer: copying.

The model is GPT-shaped and small: token and position embeddings, ``depth`` pre-norm
blocks (causal self-attention with its own query/key/value and output ``nn.Linear``
projections, then a GELU MLP of width 4 d), a final LayerNorm and a Linear head whose
weight is, optionally, the token embedding's (weight tying). Its Linear layers are what
the Kronecker optimizers precondition; the embeddings and LayerNorms go to the fallback.

The task: a sequence of `COPY_LENGTH` random symbols, a separator, then the same symbols
again. The first half is noise that no model can predict; the second half has exactly
one right answer per position, so the loss and the metric count only those positions
(targets elsewhere are `IGNORE`). Predicting the copy needs attention to the token
``COPY_LENGTH + 1`` places back: a bigram table cannot do it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SYMBOLS = 16
"""Distinct symbols to copy; the separator is one more token."""
VOCAB = SYMBOLS + 1
SEPARATOR = SYMBOLS
COPY_LENGTH = 6
CONTEXT = 2 * COPY_LENGTH
"""Tokens the model reads: the symbols, the separator and all but the last copied one."""
IGNORE = -100
"""Target of a position without a right answer (``F.cross_entropy``'s ``ignore_index``)."""
TEST_SEED = 2**31 - 1
"""Seed of the held-out sequences the metric reads; training seeds are the suite's."""
TEST_SIZE = 512


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which a token sees itself and the tokens before it."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}.")
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape

        def split(t: Tensor) -> Tensor:
            return t.reshape(batch, length, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(h.transpose(1, 2).reshape(batch, length, width))


class DecoderBlock(nn.Module):
    """Pre-norm: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (GELU, width 4 d)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CausalLM(nn.Module):
    """Decoder-only language model: ``(batch, length)`` token ids -> ``(batch, length,
    vocab)`` next-token logits.

    Args:
        vocab: Tokens in the vocabulary.
        context: Longest sequence (positions with an embedding).
        width: Model width d.
        heads: Attention heads (d must be a multiple).
        depth: Decoder blocks.
        tie_weights: Whether the head's weight is the token embedding's.
    """

    def __init__(
        self,
        vocab: int = VOCAB,
        context: int = CONTEXT,
        width: int = 64,
        heads: int = 4,
        depth: int = 2,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(DecoderBlock(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        # Embeddings of unit scale would make the tied head's logits of size sqrt(d).
        for embedding in (self.embed, self.position):
            nn.init.normal_(embedding.weight, std=1 / math.sqrt(width))
        if tie_weights:
            self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.blocks(self.embed(tokens) + self.position(positions))
        return self.head(self.norm(h))


def copy_sequences(count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``count`` copy-task examples: inputs ``(count, CONTEXT)`` int64 token ids and
    targets of the same shape, `IGNORE` except where the copy is predicted."""
    symbols = torch.randint(0, SYMBOLS, (count, COPY_LENGTH), generator=generator)
    separator = torch.full((count, 1), SEPARATOR)
    sequence = torch.cat([symbols, separator, symbols], dim=1)
    inputs, targets = sequence[:, :-1], sequence[:, 1:].clone()
    targets[:, :COPY_LENGTH] = IGNORE  # the random symbols and the separator: no right answer
    return inputs, targets


def copy_batches(batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless fresh training batches drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield copy_sequences(batch_size, generator)


def answer_accuracy(model: nn.Module) -> float:
    """Next-token accuracy on the answer positions of `TEST_SIZE` held-out sequences, in
    [0, 1] (chance: 1 / `SYMBOLS`)."""
    inputs, targets = copy_sequences(TEST_SIZE, torch.Generator().manual_seed(TEST_SEED))
    device = next(model.parameters()).device
    predicted = model(inputs.to(device)).argmax(dim=-1).cpu()
    answered = targets != IGNORE
    return float((predicted[answered] == targets[answered]).double().mean())
