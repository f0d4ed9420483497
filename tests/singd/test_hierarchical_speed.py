"""The fast paths that the hierarchical SINGD step takes, against dense float64 algebra.

``add_product_`` (``S <- S + alpha S T``, SINGD's factor step ``K <- K (I - beta1 m_K)``)
adds the blocks of ``S T`` without copying them for hierarchical factors; every other
structure takes the base class's ``add_(S @ T)``. Operands are stored in the tested
dtype and the reference computes densely on exactly those stored values, as the
structures' property suite does (`tests/singd/structures/test_properties.py`).
"""

from __future__ import annotations

import pytest
import torch

from singd.structures import get_structure
from tests.singd.structures.cases import CASE_IDS, CASES, DTYPES, random_structured
from tests.singd.structures.test_properties import assert_within

F64 = torch.float64


@pytest.mark.parametrize(
    "alpha", [-0.375, torch.tensor(-0.375, dtype=F64)], ids=["float", "tensor"]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "dim"), CASES, ids=CASE_IDS)
def test_add_product_equals_dense_algebra(name, dim, dtype, alpha):
    S, S64 = random_structured(name, dim, dtype, seed=40)
    T, T64 = random_structured(name, dim, dtype, seed=41)
    before = {key: t.clone() for key, t in T.tensors().items()}
    assert S.add_product_(T, alpha=alpha) is S
    assert S.dtype == dtype
    expected = S64 - 0.375 * S64 @ T64
    bound = S64.abs() + 0.375 * S64.abs() @ T64.abs()
    assert_within(S.to_dense(), expected, bound, dtype, name)
    for key, t in T.tensors().items():  # the right factor is read, not changed
        assert torch.equal(t, before[key])


def test_add_product_reaches_the_cached_rows():
    """The hierarchical rows W kept for products are rebuilt after ``add_product_``."""
    cls = get_structure("hierarchical15_15")
    S, _ = random_structured("hierarchical15_15", 47, torch.float64, seed=42)
    T, _ = random_structured("hierarchical15_15", 47, torch.float64, seed=43)
    X = torch.randn(47, 5, dtype=F64, generator=torch.Generator().manual_seed(44))
    S.outer_matmat_(X.clone())  # builds and keeps S's rows
    S.add_product_(T, alpha=0.5)
    fresh = cls.from_tensors(47, {key: t.clone() for key, t in S.tensors().items()})
    assert torch.equal(S.outer_matmat_(X.clone()), fresh.outer_matmat_(X.clone()))
    assert torch.equal(S.from_inner().to_dense(), fresh.from_inner().to_dense())
