"""The four recursive triangular structures of the reference: a diagonal plus one line.

Each is a diagonal matrix with one extra row or column, 2d - 1 stored entries. They are
named after where their diagonal block sits (the other corner is a 1 x 1 block):

==========================  ===========================  ===========================
name                        layout                       extra line
==========================  ===========================  ===========================
``triltopleftdiag``         ``[[diag, 0], [row, c]]``    last row
``trilbottomrightdiag``     ``[[a, 0], [column, diag]]`` first column
``triutopleftdiag``         ``[[diag, column], [0, c]]`` last column
``triubottomrightdiag``     ``[[a, row], [0, diag]]``    first row
==========================  ===========================  ===========================

With p the index of the extra line (d - 1 or 0) and w the line (zero at p), a "row"
structure is ``R = diag(s) + e_p w^T`` and a "column" structure is its transpose
``diag(s) + w e_p^T``. Both are closed under products: ``R_1 R_2 = diag(s_1 s_2) +
e_p (s_1[p] w_2 + w_1 s_2)^T``. ``P(M)`` keeps the diagonal and folds the line:
``w_j = M[p, j] + M[j, p]``. Every operation is O(d) or O(n d), except the base class's
fallbacks used for ``from_inner2`` (O(d^2) structured products on its dense d x d input)
and ``extreme_singular_values`` (dense float64 singular values, a probe's diagnostic).
"""

from __future__ import annotations

from typing import ClassVar, Self

import torch
from torch import Tensor

from singd.structures.base import StructuredMatrix, stored_frobenius_norm


class TriangularArrowMatrix(StructuredMatrix):
    """Diagonal plus one row or column; subclasses fix which.

    Stored tensors: ``diag`` (d,), ``line`` (d - 1,): the extra line without its diagonal
    entry, in index order.

    Attributes:
        lower: Lower (tril) or upper (triu) triangular.
        diagonal_top_left: The diagonal block is at the top left (the line is the last
            row or column) or at the bottom right (the line is the first).
    """

    lower: ClassVar[bool]
    diagonal_top_left: ClassVar[bool]

    @classmethod
    def tensor_shapes(cls, dim: int) -> dict[str, tuple[int, ...]]:
        return {"diag": (dim,), "line": (dim - 1,)}

    @classmethod
    def _row_kind(cls) -> bool:
        """True when the line is a row (e_p w^T), False when it is a column."""
        return cls.lower == cls.diagonal_top_left

    @classmethod
    def _layout(cls, dim: int) -> tuple[int, slice]:
        """The line's index p and the slice of the other indices."""
        if cls.diagonal_top_left:
            return dim - 1, slice(0, dim - 1)
        return 0, slice(1, dim)

    def _new(self, diag: Tensor, line: Tensor) -> Self:
        return type(self)(self._dim, {"diag": diag, "line": line})

    @classmethod
    def from_dense(cls, sym: Tensor) -> Self:
        dim = sym.shape[0]
        p, others = cls._layout(dim)
        line = sym[p, others] + sym[others, p]
        return cls(dim, {"diag": sym.diagonal().clone(), "line": line})

    def to_dense(self) -> Tensor:
        p, others = self._layout(self._dim)
        out = torch.diag(self._tensors["diag"])
        if self._row_kind():
            out[p, others] = self._tensors["line"]
        else:
            out[others, p] = self._tensors["line"]
        return out

    def _row_product(self, X: Tensor) -> Tensor:
        """``R X`` with ``R = diag(s) + e_p w^T``."""
        p, others = self._layout(self._dim)
        out = self._tensors["diag"].unsqueeze(1) * X
        out[p] += self._tensors["line"] @ X[others]
        return out

    def _row_transposed_product(self, X: Tensor) -> Tensor:
        """``R^T X = diag(s) X + w X[p]``."""
        p, others = self._layout(self._dim)
        out = self._tensors["diag"].unsqueeze(1) * X
        out[others].addr_(self._tensors["line"], X[p])  # in place: no (d - 1) x n temporary
        return out

    def _matmat(self, X: Tensor) -> Tensor:
        return self._row_product(X) if self._row_kind() else self._row_transposed_product(X)

    def _rmatmat(self, X: Tensor) -> Tensor:
        return self._row_transposed_product(X) if self._row_kind() else self._row_product(X)

    def _right_matmat(self, X: Tensor) -> Tensor:
        # X R = X diag(s) + X[:, p] w^T and X C = X diag(s) + (X w) e_p^T, on X's own
        # (n, d) layout.
        p, others = self._layout(self._dim)
        out = X * self._tensors["diag"]
        if self._row_kind():
            out[:, others].addr_(X[:, p], self._tensors["line"])
        else:
            out[:, p] += X[:, others] @ self._tensors["line"]
        return out

    def _matmul_structured(self, other: Self) -> Self:
        # A column structure is the transpose of a row structure: C_1 C_2 = (R_2 R_1)^T.
        first, second = (self, other) if self._row_kind() else (other, self)
        p, others = self._layout(self._dim)
        s1, w1 = first._tensors["diag"], first._tensors["line"]
        s2, w2 = second._tensors["diag"], second._tensors["line"]
        return self._new(s1 * s2, s1[p] * w2 + w1 * s2[others])

    @classmethod
    def from_gram(cls, X: Tensor) -> Self:
        dim = X.shape[1]
        p, others = cls._layout(dim)
        line = 2 * (X[:, others].T @ X[:, p])
        return cls(dim, {"diag": (X * X).sum(0), "line": line})

    def _from_inner_identity(self) -> Self:
        p, others = self._layout(self._dim)
        s, w = self._tensors["diag"], self._tensors["line"]
        diag = s * s
        if self._row_kind():
            # R^T R = diag(s^2) + s_p (e_p w^T + w e_p^T) + w w^T
            diag[others] += w * w
            return self._new(diag, 2 * s[p] * w)
        # C^T C = R R^T = diag(s^2) + (s w) e_p^T + e_p (s w)^T + |w|^2 e_p e_p^T
        diag[p] += (w * w).sum()
        return self._new(diag, 2 * s[others] * w)

    def diag_add_(self, value: float | Tensor) -> Self:
        self._tensors["diag"].add_(value)
        return self

    def diagonal(self) -> Tensor:
        return self._tensors["diag"].clone()

    def frobenius_norm(self) -> Tensor:
        return stored_frobenius_norm(self._tensors)


class TrilTopLeftDiagonalMatrix(TriangularArrowMatrix):
    """``[[diag, 0], [row, c]]``: lower triangular, extra last row."""

    name: ClassVar[str] = "triltopleftdiag"
    lower: ClassVar[bool] = True
    diagonal_top_left: ClassVar[bool] = True


class TrilBottomRightDiagonalMatrix(TriangularArrowMatrix):
    """``[[a, 0], [column, diag]]``: lower triangular, extra first column."""

    name: ClassVar[str] = "trilbottomrightdiag"
    lower: ClassVar[bool] = True
    diagonal_top_left: ClassVar[bool] = False


class TriuTopLeftDiagonalMatrix(TriangularArrowMatrix):
    """``[[diag, column], [0, c]]``: upper triangular, extra last column."""

    name: ClassVar[str] = "triutopleftdiag"
    lower: ClassVar[bool] = False
    diagonal_top_left: ClassVar[bool] = True


class TriuBottomRightDiagonalMatrix(TriangularArrowMatrix):
    """``[[a, row], [0, diag]]``: upper triangular, extra first row."""

    name: ClassVar[str] = "triubottomrightdiag"
    lower: ClassVar[bool] = False
    diagonal_top_left: ClassVar[bool] = False
