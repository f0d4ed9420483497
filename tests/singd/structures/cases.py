"""The structures, dimensions and dtypes every structure test runs over, and the
slow, obviously right float64 references those tests compare against."""

from __future__ import annotations

import torch
from torch import Tensor

from singd.structures import StructuredMatrix, get_structure

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# Dimensions from 1 through below, at and above each structure's block sizes.
DIMS: dict[str, list[int]] = {
    "dense": [1, 2, 5, 31],
    "diagonal": [1, 2, 5, 47],
    "block3diagonal": [1, 2, 3, 4, 7],
    "block30diagonal": [1, 2, 5, 29, 30, 31, 47, 61],
    "hierarchical2_3": [1, 2, 3, 4, 5, 6, 9],
    "hierarchical15_15": [1, 2, 5, 14, 15, 16, 29, 30, 31, 47, 61],
    "triltoeplitz": [1, 2, 5, 47],
    "triutoeplitz": [1, 2, 5, 47],
    "triltopleftdiag": [1, 2, 5, 31],
    "trilbottomrightdiag": [1, 2, 5, 31],
    "triutopleftdiag": [1, 2, 5, 31],
    "triubottomrightdiag": [1, 2, 5, 31],
}

CASES = [(name, dim) for name, dims in DIMS.items() for dim in dims]
CASE_IDS = [f"{name}-{dim}" for name, dim in CASES]

TOEPLITZ = {"triltoeplitz", "triutoeplitz"}


def storage_formula(name: str, dim: int) -> int:
    """Entries stored, as REFERENCE.md's table gives them (written out independently)."""
    if name == "dense":
        return dim * dim
    if name in {"diagonal", *TOEPLITZ}:
        return dim
    if name.startswith("block"):
        size = int(name[len("block") : -len("diagonal")])
        return (dim // size) * size * size + (dim % size) ** 2
    if name.startswith("hierarchical"):
        k1, k2 = (int(k) for k in name[len("hierarchical") :].split("_"))
        if dim <= k1:
            return dim * dim
        if dim <= k1 + k2:
            rest = dim - k1
            return k1 * k1 + k1 * rest + rest * rest
        middle = dim - k1 - k2
        return k1 * k1 + k1 * (dim - k1) + middle + k2 * middle + k2 * k2
    return 2 * dim - 1  # the four recursive triangular structures


def support(cls: type[StructuredMatrix], dim: int) -> Tensor:
    """Boolean d x d mask of the entries the structure can hold (nonzero for random
    stored tensors, almost surely)."""
    generator = torch.Generator().manual_seed(dim)
    tensors = {
        key: torch.randn(shape, dtype=torch.float64, generator=generator) + 3.0
        for key, shape in cls.tensor_shapes(dim).items()
    }
    return cls.from_tensors(dim, tensors).to_dense() != 0


def reference_projection(name: str, M: Tensor) -> Tensor:
    """``P(M)`` in float64, entry by entry from the rule in REFERENCE.md.

    On the support: an entry whose mirror is also in the support keeps ``M_ij``; an
    entry whose mirror is not (a one-sided off-diagonal part) gets ``M_ij + M_ji``.
    Toeplitz structures then average these values along each diagonal, which makes
    ``t[k]`` the mean of the k-th lower plus the mean of the k-th upper diagonal.
    """
    cls = get_structure(name)
    dim = M.shape[0]
    mask = support(cls, dim)
    folded = torch.where(mask & ~mask.T, M + M.T, M)
    out = torch.zeros_like(M)
    if name not in TOEPLITZ:
        out[mask] = folded[mask]
        return out
    index = torch.arange(dim)
    lags = (index.unsqueeze(1) - index.unsqueeze(0)).abs()
    for lag in range(dim):
        on_diagonal = mask & (lags == lag)
        out[on_diagonal] = folded[on_diagonal].mean()
    return out


def random_symmetric(dim: int, generator: torch.Generator) -> Tensor:
    """A float64 symmetric matrix with entries of order 1 / sqrt(d)."""
    M = torch.randn(dim, dim, dtype=torch.float64, generator=generator) / dim**0.5
    return (M + M.T) / 2


def random_structured(
    name: str, dim: int, dtype: torch.dtype, seed: int
) -> tuple[StructuredMatrix, Tensor]:
    """A non-symmetric member of the structure, in ``dtype``, and its exact float64 dense
    matrix (the operand as stored, upcast).

    Built as ``(P(A) + I) @ (P(B) + I)`` for random symmetric A, B: products of
    projections leave the symmetric matrices, as SINGD's K and C do after one update.
    """
    cls = get_structure(name)
    generator = torch.Generator().manual_seed(seed)
    first = cls.from_dense(random_symmetric(dim, generator)).diag_add_(1.0)
    second = cls.from_dense(random_symmetric(dim, generator)).diag_add_(1.0)
    S = (first @ second).to(dtype=dtype)
    return S, S.to(dtype=torch.float64).to_dense()
