"""The operations SINGD calls never build a dense d x d matrix for a non-dense structure.

Every aten operation is observed (not patched) through a dispatch mode, which records
the size of each newly allocated storage. At d = 1024 a dense float32 d x d matrix
needs 4 MiB; the structured operations here need at most about 0.13 MiB (FFT buffers of
(d + 1) x n complex numbers, n = 16), so a ceiling of d^2 / 8 float32 entries (0.5 MiB)
separates the two by a wide margin either way.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from singd.structures import STRUCTURE_NAMES, get_structure

DIM, ROWS = 1024, 16
CEILING_BYTES = DIM * DIM * 4 // 8
STRUCTURED = [name for name in STRUCTURE_NAMES if name != "dense"] + ["block3diagonal"]


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage (B) any aten operation allocates while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.operation = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                size = t.untyped_storage().nbytes()
                if size > self.largest:
                    self.largest, self.operation = size, str(func)
        return out


def optimizer_operations(name: str, dim: int):
    """The structure operations one SINGD step performs, by name."""
    cls = get_structure(name)
    K = cls.eye(dim)
    m = cls.zeros(dim)
    X = torch.randn(ROWS, dim)
    G = torch.randn(dim, ROWS)
    return {
        "eye": lambda: cls.eye(dim),
        "zeros": lambda: cls.zeros(dim),
        "from_gram": lambda: cls.from_gram(X),
        "from_inner(X)": lambda: K.from_inner(G),
        "from_inner()": lambda: K.from_inner(),
        "K @ tensor": lambda: K @ G,
        "rmatmat": lambda: K.rmatmat(G),
        "K @ m": lambda: K @ m,
        "add_": lambda: m.add_(K, alpha=0.5),
        "mul_": lambda: m.mul_(0.5),
        "diag_add_": lambda: m.diag_add_(-1.0),
        "average_trace": lambda: K.average_trace(),
        "infinity_vector_norm": lambda: K.infinity_vector_norm(),
        "frobenius_norm": lambda: K.frobenius_norm(),
        "diagonal": lambda: K.diagonal(),
        "tensors/from_tensors": lambda: cls.from_tensors(dim, K.tensors()),
    }


@pytest.mark.parametrize("name", STRUCTURED)
def test_optimizer_operations_allocate_no_dense_matrix(name):
    for operation, run in optimizer_operations(name, DIM).items():
        with LargestAllocation() as mode:
            run()
        assert mode.largest < CEILING_BYTES, (
            f"{name}.{operation} allocated {mode.largest} B in {mode.operation}, "
            f"a dense {DIM} x {DIM} float32 matrix is {DIM * DIM * 4} B"
        )


def test_the_observer_sees_a_dense_matrix():
    """The check above could fail: the dense fallback of the base class is caught."""
    cls = get_structure("diagonal")
    K = cls.eye(DIM)
    with LargestAllocation() as mode:
        super(cls, K).diag_add_(1.0)  # the base class's dense fallback
    assert mode.largest >= DIM * DIM * 4


@pytest.mark.parametrize("name", ["diagonal", "block30diagonal"])
def test_extreme_singular_values_need_no_dense_decomposition(name):
    dim = 4096
    K = get_structure(name).eye(dim)
    with LargestAllocation() as mode:
        sigma_max, sigma_min = K.extreme_singular_values()
    assert sigma_max.item() == sigma_min.item() == 1.0
    assert mode.largest < dim * dim // 8
