"""A workload written with plain PyTorch: its own model, data, loss and metric.

Run it with:

    precision-lab stress --models examples/tabular_classifier.py:build --dtype bf16

The task: customers described by 12 numeric features and a store id (one of 20), in one
of 4 classes set by a fixed random teacher. Inputs are a dict, ``{"numeric": float32
(batch, 12), "store": int64 (batch,)}``: precision-lab casts the numeric features to the
run's dtype and leaves the store ids integer. The model embeds the store, concatenates
it with the numeric features and classifies them with a two-layer MLP; SINGD and KFAC
precondition its Linear layers, the fallback optimizer trains the embedding. The metric
is the accuracy on 1,000 held-out customers.
"""

import torch
from torch import nn

import precision_lab

FEATURES, STORES, CLASSES = 12, 20, 4
BATCH = 64


class Classifier(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.store = nn.Embedding(STORES, 8)
        self.mlp = nn.Sequential(
            nn.Linear(FEATURES + 8, width), nn.Tanh(), nn.Linear(width, CLASSES)
        )

    def forward(self, numeric: torch.Tensor, store: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([numeric, self.store(store)], dim=1))


def customers(count: int, generator: torch.Generator) -> tuple[dict, torch.Tensor]:
    """``count`` customers and their classes; the teacher is the same for every call."""
    teacher = torch.Generator().manual_seed(1234)
    weights = torch.randn(FEATURES, CLASSES, generator=teacher)
    store_bias = torch.randn(STORES, CLASSES, generator=teacher)
    numeric = torch.randn(count, FEATURES, generator=generator)
    store = torch.randint(0, STORES, (count,), generator=generator)
    labels = (numeric @ weights + store_bias[store]).argmax(dim=1)
    return {"numeric": numeric, "store": store}, labels


def batches(seed: int):
    """Endless training batches, a fresh draw each, in an order fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield customers(BATCH, generator)


def held_out_accuracy(model: nn.Module) -> float:
    inputs, labels = customers(1_000, torch.Generator().manual_seed(999))
    return float((model(**inputs).argmax(dim=1) == labels).float().mean())


def build() -> precision_lab.Workload:
    return precision_lab.Workload(
        model=Classifier,
        batches=batches,
        metric=held_out_accuracy,
        name="tabular",
        chance=precision_lab.chance_accuracy(CLASSES, 1_000),
    )
