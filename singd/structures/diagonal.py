"""The diagonal factor: d stored entries, every operation O(d) or O(n d)."""

from __future__ import annotations

from typing import ClassVar, Self

import torch
from torch import Tensor

from singd.structures.base import StructuredMatrix, _rows_of, stored_frobenius_norm


class DiagonalMatrix(StructuredMatrix):
    """``S = diag(s)``; the projection keeps the diagonal, ``P(M) = diag(diag(M))``.

    Stored tensor: ``diag`` (d,).
    """

    name: ClassVar[str] = "diagonal"

    @classmethod
    def tensor_shapes(cls, dim: int) -> dict[str, tuple[int, ...]]:
        return {"diag": (dim,)}

    @classmethod
    def from_dense(cls, sym: Tensor) -> Self:
        return cls(sym.shape[0], {"diag": sym.diagonal().clone()})

    @property
    def diag(self) -> Tensor:
        """The stored diagonal itself (live, not a copy: writing it changes the matrix)."""
        return self._tensors["diag"]

    def to_dense(self) -> Tensor:
        return torch.diag(self._tensors["diag"])

    def _matmat(self, X: Tensor) -> Tensor:
        return self._tensors["diag"].unsqueeze(1) * X

    _rmatmat = _matmat

    def outer_matmat_(self, X: Tensor) -> Tensor:
        """``X <- diag(s)^2 X`` in X's memory (row i scaled by ``s_i^2``); returns X.

        Scaled by ``s`` twice rather than once by ``s * s``: the same roundings as the
        fallback ``S (S^T X)``, and no spurious overflow or underflow of ``s_i^2`` (float16
        from ``|s_i|`` above 256 or below about 2.4e-4) where the result is representable.
        """
        self._check_operand(X)
        s = self._tensors["diag"].unsqueeze(1)
        return X.to(self.dtype).mul_(s).mul_(s)

    def _right_matmat(self, X: Tensor) -> Tensor:
        return X * self._tensors["diag"]

    def _matmul_structured(self, other: Self) -> Self:
        return type(self)._trusted(
            self._dim, {"diag": self._tensors["diag"] * other._tensors["diag"]}
        )

    @classmethod
    def from_gram(cls, X: Tensor) -> Self:
        # diag(X^T X)_j = sum_i X_ij^2
        return cls(X.shape[1], {"diag": (X * X).sum(0)})

    def from_inner(self, X: Tensor | None = None) -> Self:
        if X is None:
            return self._from_inner_identity()
        rows = _rows_of(X, self._dim)
        s = self._tensors["diag"]
        # diag(S X X^T S)_j = s_j^2 sum_i X_ji^2, the column sums of the rows X^T scaled
        # in place.
        return type(self)._trusted(
            self._dim, {"diag": rows.to(self.dtype).square().sum(0).mul_(s * s)}
        )

    def from_input_rows(self, X: Tensor, ones_column: bool) -> Self:
        """``P(S^T Y^T Y S)`` for ``Y = [X | 1] / sqrt(n)`` (``[X] / sqrt(n)`` without the
        ones column), ``X`` of shape (n, d - 1) (or (n, d)), without forming ``Y``.

        SINGD's input-side curvature term: ``Y`` is the rows of a layer's input with the
        bias's ones column, scaled by ``1/sqrt(n)`` (`singd.optim.layers.process_input`).
        Its diagonal is ``s_j^2 sum_i X_ij^2 / n`` and, for the ones column, ``s_d^2``
        exactly: no copy of the input with a column appended.
        """
        if X.ndim != 2 or X.shape[1] != self._dim - ones_column:
            raise ValueError(
                f"from_input_rows expects X of shape (n, {self._dim - ones_column}), "
                f"got {tuple(X.shape)}."
            )
        X = X if X.dtype == self.dtype else X.to(self.dtype)
        means = (X * X).mean(0)  # before s^2 exists: X * X is the peak of this call
        s = self._tensors["diag"]
        diag = s * s  # the ones column's entry is s_d^2 exactly: the others scaled here
        (diag[:-1] if ones_column else diag).mul_(means)
        return type(self)._trusted(self._dim, {"diag": diag})

    def from_output_rows(self, X: Tensor, scale: float | Tensor) -> Self:
        """``P(S^T Y^T Y S)`` for ``Y = sqrt(scale) X``, ``X`` of shape (n, d), without
        forming ``Y``: the diagonal ``s_j^2 scale sum_i X_ij^2``.

        SINGD's output-side curvature term: ``X`` is the rows of a layer's output
        gradient, ``scale`` the loss terms over the previous gradient scale
        (`singd.optim.layers.process_grad_output`, `singd.optim.scaling`); a 0-d tensor
        ``scale`` is not read.
        """
        if X.ndim != 2 or X.shape[1] != self._dim:
            raise ValueError(
                f"from_output_rows expects X of shape (n, {self._dim}), got {tuple(X.shape)}."
            )
        X = X if X.dtype == self.dtype else X.to(self.dtype)
        s = self._tensors["diag"]
        diag = (X * X).sum(0).mul_(s * s)
        if isinstance(scale, Tensor) or scale != 1.0:
            diag.mul_(scale)
        return type(self)._trusted(self._dim, {"diag": diag})

    def _from_inner_identity(self) -> Self:
        s = self._tensors["diag"]
        return type(self)._trusted(self._dim, {"diag": s * s})

    def from_inner2(self, XXT: Tensor) -> Self:
        self._check_operand(XXT)
        s = self._tensors["diag"]
        return type(self)._trusted(self._dim, {"diag": s * s * XXT.diagonal().to(self.dtype)})

    def diag_add_(self, value: float | Tensor) -> Self:
        self._tensors["diag"].add_(value)
        return self

    def diagonal(self) -> Tensor:
        return self._tensors["diag"].clone()

    def average_trace(self) -> Tensor:
        return self._tensors["diag"].mean()  # no copy of the diagonal, as the fallback makes

    def frobenius_norm(self) -> Tensor:
        return stored_frobenius_norm(self._tensors)

    def extreme_singular_values(self) -> tuple[Tensor, Tensor]:
        """Exact in O(d): the singular values of a diagonal matrix are ``|s_j|``."""
        if not self._all_finite():
            return super().extreme_singular_values()
        magnitudes = self._tensors["diag"].to(torch.float64).abs()
        return magnitudes.max().cpu(), magnitudes.min().cpu()
