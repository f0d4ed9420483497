"""Triangular Toeplitz factors ``triltoeplitz`` and ``triutoeplitz``: d stored entries.

A lower triangular Toeplitz matrix ``L(t)`` has ``L[i, j] = t[i - j]`` for ``i >= j``; the
upper one is its transpose, ``U(t) = L(t)^T``. Both are polynomials in the shift matrix,
so they form commutative groups: ``L(a) L(b) = L((a * b)[:d])``, the product of the
polynomials truncated to degree d - 1.

Every operation is a convolution or correlation along the dimension, computed with FFTs
of a fast length >= 2d - 1 (no wrap-around for lags below d): ``S @ X``, ``S^T @ X`` and
``X @ S`` cost O(n d log d) for n vectors of length d, never a d x d matrix (the
reference builds the dense matrix, REFERENCE.md gap 4).

``P(M)``: ``t[0] = trace(M) / d`` and, for k >= 1, ``t[k]`` = mean of the k-th lower
diagonal + mean of the k-th upper diagonal (the same rule for both structures).
The Gram projection needs only the lag-k autocorrelations ``a[k] = sum_{r, j} X[r, j]
X[r, j + k]`` of the rows of X, which one FFT pass gives.

Precision: torch has no float16/bfloat16 FFT on the CPU (and on CUDA only for power-of-2
lengths), so the FFTs for half types run in float32 and the result is cast back; float64
runs in float64. Diagonal sums in :meth:`from_dense` accumulate in the same wider dtype.

``from_inner2`` (not on the optimizer's path) and ``extreme_singular_values`` (a probe's
diagnostic) use the base class's fallbacks: FFT products on the dense d x d input, and
singular values of the dense matrix in float64.
"""

from __future__ import annotations

from functools import cache
from typing import ClassVar, Self

import torch
from torch import Tensor

from singd.structures.base import StructuredMatrix


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype FFTs and sums run in: float64 stays, everything else uses float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@cache
def fft_length(dim: int) -> int:
    """The smallest 5-smooth length (2^a 3^b 5^c) >= 2d - 1: long enough that products
    of two length-d sequences do not wrap around, and fast for pocketfft/cuFFT (a length
    such as 2 * 257 with a large prime factor is several times slower)."""
    target = max(2 * dim - 1, 1)
    best = 1 << (target - 1).bit_length()
    power5 = 1
    while power5 < best:
        power35 = power5
        while power35 < best:
            length = power35
            while length < target:
                length *= 2
            best = min(best, length)
            power35 *= 3
        power5 *= 5
    return best


def toeplitz_rows(t: Tensor, Y: Tensor, transpose: bool) -> Tensor:
    """Each row y of Y (..., d) times ``L(t)`` or its transpose, as 1-D sequences.

    ``transpose=False``: ``L(t) y``, the causal convolution ``sum_{k <= i} t[k] y[i - k]``.
    ``transpose=True``: ``L(t)^T y``, the correlation ``sum_k t[k] y[i + k]`` (the
    conjugate spectrum of t). Both are exact for lags below d with FFTs of length >= 2d - 1.
    """
    dim, wide = Y.shape[-1], _wide(Y.dtype)
    size = fft_length(dim)
    kernel = torch.fft.rfft(t.to(wide), n=size)
    if transpose:
        kernel = kernel.conj()
    product = torch.fft.irfft(kernel * torch.fft.rfft(Y.to(wide), n=size), n=size)
    return product[..., :dim].to(Y.dtype)


def cross_correlation(a: Tensor, b: Tensor) -> Tensor:
    """``c[k] = sum_u a[u] b[u + k]`` for lags 0 <= k < d, in the wide dtype."""
    dim = a.shape[-1]
    size = fft_length(dim)
    spectrum = torch.fft.rfft(a, n=size).conj() * torch.fft.rfft(b, n=size)
    return torch.fft.irfft(spectrum, n=size)[:dim]


def _fold_diagonal_sums(sums: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """``P`` from the lag sums of a symmetric matrix: ``t[0] = s[0] / d``,
    ``t[k] = 2 s[k] / (d - k)``."""
    counts = torch.arange(dim, 0, -1, dtype=sums.dtype, device=sums.device)
    coefficients = 2 * sums / counts
    coefficients[0] = sums[0] / dim
    return coefficients.to(dtype)


class ToeplitzMatrix(StructuredMatrix):
    """Triangular Toeplitz matrix; subclasses fix the triangle.

    Stored tensor: ``coefficients`` (d,), ``t[0]`` on the main diagonal, ``t[k]`` on the
    k-th diagonal below (triltoeplitz) or above (triutoeplitz) it.
    """

    lower: ClassVar[bool]

    @classmethod
    def tensor_shapes(cls, dim: int) -> dict[str, tuple[int, ...]]:
        return {"coefficients": (dim,)}

    @property
    def _t(self) -> Tensor:
        return self._tensors["coefficients"]

    def _new(self, coefficients: Tensor) -> Self:
        return type(self)(self._dim, {"coefficients": coefficients})

    @classmethod
    def from_dense(cls, sym: Tensor) -> Self:
        dim = sym.shape[0]
        rows = torch.arange(dim, device=sym.device)
        lags = (rows.unsqueeze(0) - rows.unsqueeze(1)).abs().reshape(-1)  # |j - i|
        sums = torch.zeros(dim, dtype=_wide(sym.dtype), device=sym.device)
        sums.index_add_(0, lags, sym.reshape(-1).to(sums.dtype))
        # index_add_ gave lower + upper for k >= 1, the main diagonal once: the rule's
        # "mean of lower + mean of upper" is this sum over (d - k).
        counts = torch.arange(dim, 0, -1, dtype=sums.dtype, device=sym.device)
        return cls(dim, {"coefficients": (sums / counts).to(sym.dtype)})

    def to_dense(self) -> Tensor:
        rows = torch.arange(self._dim, device=self.device)
        lags = rows.unsqueeze(1) - rows.unsqueeze(0)  # i - j
        if not self.lower:
            lags = -lags
        padded = torch.cat([self._t, self._t.new_zeros(1)])
        # Lags outside [0, d) point at the appended zero.
        index = torch.where(lags >= 0, lags, self._dim)
        return padded[index]

    # The upper structure is the transpose of the lower one: U(t) = L(t)^T. Results keep
    # the layout the FFTs produce (no transposing copy, ~0.4 ms for 1 MB here).
    def _matmat(self, X: Tensor) -> Tensor:
        return toeplitz_rows(self._t, X.T, transpose=not self.lower).T

    def _rmatmat(self, X: Tensor) -> Tensor:
        return toeplitz_rows(self._t, X.T, transpose=self.lower).T

    def _right_matmat(self, X: Tensor) -> Tensor:
        # X S = (S^T X^T)^T: the rows of X, each times S^T.
        return toeplitz_rows(self._t, X, transpose=self.lower)

    def _matmul_structured(self, other: Self) -> Self:
        # clone: own storage of d entries, not a view into the longer FFT buffer
        return self._new(toeplitz_rows(self._t, other._t, transpose=False).clone())

    @classmethod
    def from_gram(cls, X: Tensor) -> Self:
        dim, wide = X.shape[1], _wide(X.dtype)
        size = fft_length(dim)
        spectrum = torch.fft.rfft(X.to(wide), n=size, dim=1)
        power = (spectrum.real**2 + spectrum.imag**2).sum(0)
        lag_sums = torch.fft.irfft(power, n=size)[:dim]
        return cls(dim, {"coefficients": _fold_diagonal_sums(lag_sums, dim, X.dtype)})

    def _from_inner_identity(self) -> Self:
        """``P(S^T S)``. For both triangles the k-th lag sum of ``S^T S`` is
        ``w[k] = sum_u (d - k - u) t[u] t[u + k] = (d - k) c0[k] - c1[k]`` with the
        correlations ``c0 = corr(t, t)`` and ``c1 = corr(u t, t)``: O(d log d)."""
        dim = self._dim
        t = self._t.to(_wide(self.dtype))
        positions = torch.arange(dim, dtype=t.dtype, device=t.device)
        counts = torch.arange(dim, 0, -1, dtype=t.dtype, device=t.device)
        lag_sums = counts * cross_correlation(t, t) - cross_correlation(positions * t, t)
        return self._new(_fold_diagonal_sums(lag_sums, dim, self.dtype))

    def diag_add_(self, value: float | Tensor) -> Self:
        self._t[0].add_(value)
        return self

    def diagonal(self) -> Tensor:
        return self._t[0].expand(self._dim).clone()

    def average_trace(self) -> Tensor:
        return self._t[0].clone()

    def frobenius_norm(self) -> Tensor:
        """``sqrt(sum_k (d - k) t[k]^2)``: coefficient k fills d - k entries."""
        t = self._t.to(_wide(self.dtype))
        counts = torch.arange(self._dim, 0, -1, dtype=t.dtype, device=t.device)
        return torch.linalg.vector_norm(t * counts.sqrt()).to(self.dtype)


class TrilToeplitzMatrix(ToeplitzMatrix):
    """Lower triangular Toeplitz: ``S[i, j] = t[i - j]`` for ``i >= j``."""

    name: ClassVar[str] = "triltoeplitz"
    lower: ClassVar[bool] = True


class TriuToeplitzMatrix(ToeplitzMatrix):
    """Upper triangular Toeplitz: ``S[i, j] = t[j - i]`` for ``j >= i``."""

    name: ClassVar[str] = "triutoeplitz"
    lower: ClassVar[bool] = False
