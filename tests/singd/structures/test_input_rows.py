"""``S.from_input_rows(X, ones_column)``: SINGD's input-side term ``P(S^T Y^T Y S)`` for
``Y = [X | 1] / sqrt(n)`` without forming ``Y``, against dense float64 algebra.

The structure with this shortcut (diagonal; SINGD calls it for a diagonal K) is checked
with and without the ones column, over the dimensions and dtypes of ``cases``; tolerances as in
``test_properties`` (entrywise ``TOL[dtype]`` times the same product on absolute values).
"""

from __future__ import annotations

import math

import pytest
import torch

from singd.structures import get_structure
from tests.singd.structures.cases import CASE_IDS, CASES, DTYPES, random_structured
from tests.singd.structures.test_properties import F64, ROWS, assert_within, lowp, project

WITH_SHORTCUT = [
    (case, case_id)
    for case, case_id in zip(CASES, CASE_IDS, strict=True)
    if hasattr(get_structure(case[0]), "from_input_rows")
]


@pytest.mark.parametrize("ones_column", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("name", "dim"), [case for case, _ in WITH_SHORTCUT], ids=[i for _, i in WITH_SHORTCUT]
)
def test_from_input_rows(name, dim, dtype, ones_column):
    S, S64 = random_structured(name, dim, dtype, seed=30)
    generator = torch.Generator().manual_seed(31)
    X, X64 = lowp(torch.randn(ROWS, dim - ones_column, dtype=F64, generator=generator), dtype)
    out = S.from_input_rows(X, ones_column)
    assert type(out) is type(S) and out.dtype == dtype
    Y64 = torch.cat([X64, torch.ones(ROWS, 1, dtype=F64)], 1) if ones_column else X64
    Y64 = Y64 / math.sqrt(ROWS)
    expected = project(name, S64.T @ Y64.T @ Y64 @ S64)
    YS_abs = Y64.abs() @ S64.abs()
    assert_within(out.to_dense(), expected, project(name, YS_abs.T @ YS_abs), dtype, name)
    # No views of larger temporaries: the result holds only its own entries.
    assert sum(t.untyped_storage().nbytes() for t in out.tensors().values()) == out.nbytes


@pytest.mark.parametrize(("name", "dim"), [("diagonal", 5)])
def test_from_input_rows_checks_the_width(name, dim):
    S, _ = random_structured(name, dim, torch.float32, seed=32)
    with pytest.raises(ValueError, match="from_input_rows expects X of shape"):
        S.from_input_rows(torch.ones(3, dim), ones_column=True)
