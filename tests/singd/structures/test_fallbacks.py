"""Every fast path equals the base class's dense fallback for the same operands.

For each structure a twin class is made whose fast operations are replaced by the
:class:`StructuredMatrix` fallbacks (which expand to dense, compute, and project); both
run on the same stored tensors in float64. This checks the fast paths against slow,
obviously right code, and checks that the fallbacks, which a new structure gets for
free, are correct.
"""

from __future__ import annotations

import pytest
import torch

from singd.structures import STRUCTURE_NAMES, StructuredMatrix, get_structure
from tests.singd.structures.cases import random_structured, random_symmetric

FAST_OPERATIONS = [
    "_matmat",
    "_rmatmat",
    "_right_matmat",
    "_matmul_structured",
    "from_gram",
    "from_inner",
    "_from_inner_identity",
    "from_inner2",
    "diag_add_",
    "diagonal",
    "average_trace",
    "frobenius_norm",
    "extreme_singular_values",
]
NAMES = [*STRUCTURE_NAMES, "block3diagonal", "hierarchical2_3"]


def fallback_twin(cls: type[StructuredMatrix]) -> type[StructuredMatrix]:
    slow = {op: StructuredMatrix.__dict__[op] for op in FAST_OPERATIONS}
    return type(f"Fallback{cls.__name__}", (cls,), slow)


def same(fast, slow) -> None:
    if isinstance(fast, StructuredMatrix):
        fast, slow = fast.to_dense(), slow.to_dense()
    elif isinstance(fast, tuple):
        for pair in zip(fast, slow, strict=True):
            same(*pair)
        return
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dim", [1, 5, 31, 33])
@pytest.mark.parametrize("name", NAMES)
def test_fast_paths_equal_the_dense_fallbacks(name, dim):
    cls = get_structure(name)
    twin = fallback_twin(cls)
    S, _ = random_structured(name, dim, torch.float64, seed=20)
    T, _ = random_structured(name, dim, torch.float64, seed=21)
    S_slow, T_slow = twin.from_tensors(dim, S.tensors()), twin.from_tensors(dim, T.tensors())
    generator = torch.Generator().manual_seed(22)
    X = torch.randn(6, dim, dtype=torch.float64, generator=generator)
    A = random_symmetric(dim, generator)
    same(S @ X.T, S_slow @ X.T)
    same(S.rmatmat(X.T), S_slow.rmatmat(X.T))
    same(S._right_matmat(X), S_slow._right_matmat(X))
    same(S @ T, S_slow @ T_slow)
    same(cls.from_gram(X), twin.from_gram(X))
    same(S.from_inner(X.T), S_slow.from_inner(X.T))
    same(S.from_inner(), S_slow.from_inner())
    same(S.from_inner2(A), S_slow.from_inner2(A))
    same(S.diagonal(), S_slow.diagonal())
    same(S.average_trace(), S_slow.average_trace())
    same(S.frobenius_norm(), S_slow.frobenius_norm())
    same(S.extreme_singular_values(), S_slow.extreme_singular_values())
    same(S.clone().diag_add_(-0.5), S_slow.clone().diag_add_(-0.5))
