"""``DiagonalMatrix.from_output_rows(X, scale)``: SINGD's output-side term
``P(S^T Y^T Y S)`` for ``Y = sqrt(scale) X`` without forming ``Y``, against dense
float64 algebra, with a Python and a 0-d tensor scale; and the optimizer's output side
through it against the general path (rows scaled by `process_grad_output`, `from_inner`).
"""

from __future__ import annotations

import math

import pytest
import torch

from singd.optim.layers import KroneckerLayer, loss_terms, output_rows, process_grad_output
from singd.structures.diagonal import DiagonalMatrix
from tests.singd.structures.cases import DTYPES, random_structured
from tests.singd.structures.test_properties import F64, ROWS, assert_within, lowp, project


@pytest.mark.parametrize("scale", [1.0, 2.0**-3, "tensor"], ids=["one", "number", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_from_output_rows(dtype, scale):
    S, S64 = random_structured("diagonal", 7, dtype, seed=40)
    generator = torch.Generator().manual_seed(41)
    X, X64 = lowp(torch.randn(ROWS, 7, dtype=F64, generator=generator), dtype)
    value = 5.0 if scale == "tensor" else scale
    out = S.from_output_rows(X, torch.tensor(value, dtype=F64) if scale == "tensor" else value)
    assert type(out) is DiagonalMatrix and out.dtype == dtype
    Y64 = X64 * math.sqrt(value)
    expected = project("diagonal", S64.T @ Y64.T @ Y64 @ S64)
    YS_abs = Y64.abs() @ S64.abs()
    assert_within(out.to_dense(), expected, project("diagonal", YS_abs.T @ YS_abs), dtype, "")


def test_from_output_rows_checks_the_width():
    S, _ = random_structured("diagonal", 5, torch.float32, seed=42)
    with pytest.raises(ValueError, match="from_output_rows expects X of shape"):
        S.from_output_rows(torch.ones(3, 4), 1.0)


@pytest.mark.parametrize("loss_average", [None, "batch", "batch+sequence"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_rows_and_terms_give_the_scaled_rows(conv, kfac_approx, loss_average):
    """`output_rows` times sqrt(`loss_terms`) is `process_grad_output`, bitwise."""
    module = torch.nn.Conv2d(2, 3, 2) if conv else torch.nn.Linear(4, 3)
    layer = KroneckerLayer("layer", module, 0, True, 5 if not conv else 9, 3)
    g = torch.randn(6, 3, 4, 5) if conv else torch.randn(6, 4, 3)
    rows = output_rows(g, layer, kfac_approx)
    expected = process_grad_output(g, layer, loss_average, kfac_approx)
    terms = loss_terms(g, layer, loss_average)
    assert terms == (
        1 if loss_average is None else 6 * (20 if conv else 4) ** (loss_average == "batch+sequence")
    )
    scaled = rows if loss_average is None else rows * math.sqrt(terms)
    assert torch.equal(scaled, expected)
