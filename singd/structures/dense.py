"""The unstructured d x d factor (INGD / IKFAC use it): d^2 stored entries."""

from __future__ import annotations

import itertools
from typing import ClassVar, Self

import torch
from torch import Tensor

from singd.structures.base import StructuredMatrix, stored_frobenius_norm

FRESH_PAGES_BYTES = 128 * 1024
"""`DenseMatrix.add_product_` forms ``S T`` in spent storage from this size up."""


class DenseMatrix(StructuredMatrix):
    """A full d x d matrix; the projection ``P`` is the identity.

    Stored tensor: ``mat`` (d, d).
    """

    name: ClassVar[str] = "dense"

    @classmethod
    def tensor_shapes(cls, dim: int) -> dict[str, tuple[int, ...]]:
        return {"mat": (dim, dim)}

    @classmethod
    def from_dense(cls, sym: Tensor) -> Self:
        # A copy, so that in-place updates never write into the caller's tensor.
        return cls(sym.shape[0], {"mat": sym.clone()})

    def to_dense(self) -> Tensor:
        return self._tensors["mat"].clone()

    def _matmat(self, X: Tensor) -> Tensor:
        return self._tensors["mat"] @ X

    def _rmatmat(self, X: Tensor) -> Tensor:
        return self._tensors["mat"].T @ X

    def _right_matmat(self, X: Tensor) -> Tensor:
        return X @ self._tensors["mat"]

    def _matmul_structured(self, other: Self) -> Self:
        return type(self)._trusted(self._dim, {"mat": self._tensors["mat"] @ other._tensors["mat"]})

    def add_product_(
        self, other: StructuredMatrix, alpha: float | Tensor = 1.0, spent: Self | None = None
    ) -> Self:
        """``S <- S + alpha S T``, the product formed in ``spent``'s storage where it is
        dense, of the same dtype and at least `FRESH_PAGES_BYTES` (`matmul_into_`).

        One thread, the benchmark MLP: the step's fresh d x d products cost it about 250
        page faults, and reusing the spent Gram made the step 1% faster side by side.
        Below glibc's default mmap threshold (128 KiB, d < 182 in float32) a fresh
        product comes from the allocator's free lists, in cache, and is kept.
        """
        if (
            isinstance(spent, DenseMatrix)
            and isinstance(other, DenseMatrix)
            and self.dtype == other.dtype == spent.dtype
            and spent.nbytes >= FRESH_PAGES_BYTES
        ):
            return self.add_(self.matmul_into_(other, spent), alpha=alpha)
        return super().add_product_(other, alpha)

    def matmul_into_(self, other: Self, out: Self) -> Self:
        """``self @ other`` written into ``out``'s storage (a spent matrix); returns ``out``.

        The same product as ``self @ other``, bit for bit, without a fresh d x d result:
        on the CPU a fresh megabyte is often fresh pages, and SINGD's step paid for them
        in its ``K m_K`` products (see `singd.optim.functional.singd_factor_update`).
        """
        torch.mm(self._tensors["mat"], other._tensors["mat"], out=out._tensors["mat"])
        return out

    def outer_matmat_(self, X: Tensor, out: Tensor | None = None) -> Tensor:
        """``S S^T X``, into ``out`` where given (see `dense_outer_matmat`)."""
        return dense_outer_matmat(self._tensors["mat"], X, out=out)

    @classmethod
    def from_gram(cls, X: Tensor) -> Self:
        return cls(X.shape[1], {"mat": symmetric_gram(X)})

    def _from_inner_identity(self) -> Self:
        return type(self)._trusted(self._dim, {"mat": symmetric_gram(self._tensors["mat"])})

    def from_inner2(self, XXT: Tensor) -> Self:
        self._check_operand(XXT)
        mat = self._tensors["mat"]
        return type(self)._trusted(self._dim, {"mat": mat.T @ XXT.to(self.dtype) @ mat})

    def diag_add_(self, value: float | Tensor) -> Self:
        self._tensors["mat"].diagonal().add_(value)
        return self

    def diagonal(self) -> Tensor:
        return self._tensors["mat"].diagonal().clone()

    def frobenius_norm(self) -> Tensor:
        return stored_frobenius_norm(self._tensors)


def dense_outer_matmat(mat: Tensor, X: Tensor, out: Tensor | None = None) -> Tensor:
    """``S S^T X`` for a dense ``S`` (d, d) and ``X`` (d, n); X is not overwritten.

    As ``(S S^T) X`` where forming the symmetric ``S S^T`` first (`symmetric_gram`) costs
    fewer FLOPs, about ``1.5 d^3 + 2 d^2 n`` against ``4 d^2 n``, so for ``n > 3d / 4``;
    else as ``S (S^T X)``. A transposed X (SINGD's ``G^T``) is worked on through its
    rows, ``X^T S S^T``: one thread ran ``K^T G^T`` for a 513 x 10 ``G^T`` ten times
    slower than ``G K``; with ``S S^T`` formed, as ``(S S^T)^T X``, the transpose of
    ``X^T (S S^T)`` bit for bit, which one thread computed 1-4% faster for SINGD's
    512 x 513 layer than the product of its rows (and the result has contiguous rows).

    ``out`` (d, n), if given, receives the result (and is returned): the same products,
    bit for bit, written into memory the caller has spent, which is still in cache where
    a fresh result often is not (one thread wrote a 512 x 513 product about 10% faster
    into a recently used buffer than into a cold one). It must not overlap ``X``.
    """
    outer = symmetric_gram(mat.T) if 4 * X.shape[1] > 3 * mat.shape[0] else None
    if X.stride(0) == 1 and X.stride(1) != 1:
        rows, out_rows = X.T, None if out is None else out.T
        if outer is None:
            return torch.mm(rows @ mat, mat.T, out=out_rows).T
        outer = outer.mT
    if outer is not None:
        return torch.mm(outer, X, out=out)
    return torch.mm(mat, mat.T @ X, out=out)


def symmetric_gram(X: Tensor, out: Tensor | None = None) -> Tensor:
    """``X^T X`` for ``X`` of shape (n, d), in about 3/4 of the FLOPs per split.

    With ``X = [X_1 X_2]`` split by columns, ``X^T X = [[X_1^T X_1, X_1^T X_2],
    [(X_1^T X_2)^T, X_2^T X_2]]``: the diagonal blocks (split again) and one
    off-diagonal block are products, the other block is its exact mirror. Each entry is
    a dot product over ``n``, as in ``X.T @ X``, whose rounding it shares (the diagonal
    blocks are symmetric up to it, as ``X.T @ X`` is). `_split_gram` says whether to
    split at all; the blocks are then computed a block row at a time
    (`_gram_by_block_rows`), or by halves where the result's rows are a power of two
    apart (`_gram_by_halves`).

    Args:
        X: The (n, d) matrix, any strides.
        out: Where to write the (d, d) result, with contiguous rows (a view of a wider
            buffer is fine); a new contiguous tensor when None.
    """
    n, dim = X.shape
    if out is None:
        out = X.new_empty(dim, dim)
    if X.device.type != "cpu" or not _split_gram(n, dim):
        # Measured on one CPU thread only; on a GPU, products this size are not bound
        # by their FLOPs and every split adds kernel launches.
        return torch.mm(X.T, X, out=out)
    if out.stride(0) % 256 == 0 and n < 256:
        return _gram_by_halves(X, out)
    return _gram_by_block_rows(X, out)


def _gram_by_block_rows(X: Tensor, out: Tensor) -> Tensor:
    """`symmetric_gram` as one product per block row, ``X_i^T [X_i ... X_q]`` (the
    diagonal block and every block right of it), each followed by its mirror: the
    blocks below the diagonal block, the transpose of those right of it.

    The blocks halve ``d`` (so ``d // 2`` is a block edge) down to 64 to 127 columns
    over ``n >= 256`` rows, 128 to 255 over fewer. Where the rows of ``out`` are a power
    of two apart, a column's entries fall into few cache sets: each block row is then
    computed into a contiguous tensor and copied, and mirrored from that copy. Measured
    on one thread (AMD EPYC, MKL) against halves split twice (`_gram_by_halves`): a
    513-wide ``K^T K`` and ``K K^T`` took 0.96-0.97 of the time, a batch's 128 x 513
    Gram 0.95, the 257-wide ones 0.98, a 512-wide ``C^T C`` 0.94 and ``C C^T`` 0.98
    (through copies; in place 0.97-1.03); a 128 x 512 Gram 1.05-1.19, so
    `symmetric_gram` takes halves there.
    """
    n, dim = X.shape
    through_copy = out.stride(0) % 256 == 0
    edges = _halving_edges(0, dim, narrowest=64 if n >= 256 else 128)
    for start, stop in itertools.pairwise(edges):
        if through_copy:
            row = torch.mm(X[:, start:stop].T, X[:, start:])
            out[start:stop, start:].copy_(row)
        else:
            row = torch.mm(X[:, start:stop].T, X[:, start:], out=out[start:stop, start:])
        out[stop:, start:stop].copy_(row[:, stop - start :].T)
    return out


def _halving_edges(start: int, stop: int, narrowest: int) -> list[int]:
    """Block edges from halving ``[start, stop)`` while the halves are ``narrowest`` wide."""
    if stop - start < 2 * narrowest:
        return [start, stop]
    middle = start + (stop - start) // 2
    return _halving_edges(start, middle, narrowest)[:-1] + _halving_edges(middle, stop, narrowest)


def _gram_by_halves(X: Tensor, out: Tensor) -> Tensor:
    """`symmetric_gram` by halves, the diagonal blocks split again while `_split_gram`
    says so, for an ``out`` whose rows are a power of two apart over fewer than 256
    rows ``n``. The off-diagonal block is mirrored from a contiguous copy: one thread
    mirrored a 256 x 256 block of a 512-wide Gram 3x faster that way than from the block
    in place (the whole 512-wide Gram: 5% faster, n = 128: 10%)."""
    half = X.shape[1] // 2
    left, right = X[:, :half], X[:, half:]
    symmetric_gram(left, out[:half, :half])
    corner = torch.mm(left.T, right)
    out[:half, half:].copy_(corner)
    symmetric_gram(right, out[half:, half:])
    out[half:, :half].copy_(corner.T)
    return out


def _split_gram(n: int, dim: int) -> bool:
    """Whether `symmetric_gram` splits a ``dim``-wide Gram over ``n`` rows into blocks.

    Measured on one thread (AMD EPYC, MKL): a 513-wide ``K^T K`` split twice (blocks of
    about 128) took 0.71-0.72 of the time of ``K.T @ K``, split once 0.80; over a batch's
    128 rows, split once 0.82-0.87, where 128-wide blocks over 128 rows ran at half the
    machine's GEMM rate. In SINGD's step splitting ``K^T K`` only once was 2.6% slower.
    """
    return dim >= 512 or (dim >= 256 and n >= 256)
