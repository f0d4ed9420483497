"""The hierarchical structure keeps its dense rows ``W`` between operations until a stored
tensor changes: every in-place change must reach the next product.

Each case computes through W (so it is cached), changes the matrix in place, and
compares the next results with those of an untouched copy changed the same way (which
builds its W afresh): bitwise equal, since both run the same arithmetic.
"""

from __future__ import annotations

import pytest
import torch

from singd.structures import get_structure

NAME, DIM, ROWS = "hierarchical15_15", 47, 6

CHANGES = {
    "add_": lambda S, T: S.add_(T, alpha=0.5),
    "add_ tensor alpha": lambda S, T: S.add_(T, alpha=torch.tensor(-0.25, dtype=torch.float64)),
    "mul_": lambda S, T: S.mul_(3.0),
    "diag_add_": lambda S, T: S.diag_add_(2.0),
    "stored tensor copy_": lambda S, T: S.tensors()["D"].copy_(T.tensors()["D"]),
    "stored tensor mul_": lambda S, T: S.tensors()["B"].mul_(-1.0),
}


def _results(S, X):
    return [S.from_inner().to_dense(), S.from_inner(X.T).to_dense(), S.outer_matmat_(X.T.clone())]


@pytest.mark.parametrize("change", CHANGES)
def test_in_place_changes_reach_the_cached_rows(change):
    cls = get_structure(NAME)
    generator = torch.Generator().manual_seed(0)
    S = cls.from_dense(torch.randn(DIM, DIM, generator=generator))
    T = cls.from_dense(torch.randn(DIM, DIM, generator=generator))
    X = torch.randn(ROWS, DIM, generator=generator)
    fresh = S.clone()
    before = _results(S, X)  # builds and caches S's rows
    CHANGES[change](S, T)
    CHANGES[change](fresh, T)
    after, expected = _results(S, X), _results(fresh, X)
    assert not torch.equal(after[0], before[0])
    for got, want in zip(after, expected, strict=True):
        assert torch.equal(got, want)


def test_inference_tensors_work_without_the_cache():
    """Inference tensors keep no version counter: W is rebuilt every time."""
    cls = get_structure(NAME)
    X = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        S = cls.eye(DIM)
        projected = cls.from_dense(X.T @ X).to_dense()
        torch.testing.assert_close(S.from_inner(X.T).to_dense(), projected)
        S.diag_add_(1.0)
        torch.testing.assert_close(S.from_inner().to_dense(), 4 * torch.eye(DIM))
