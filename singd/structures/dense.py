"""The unstructured d x d factor (INGD / IKFAC use it): d^2 stored entries."""

from __future__ import annotations

from typing import ClassVar, Self

from torch import Tensor

from singd.structures.base import StructuredMatrix, stored_frobenius_norm


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

    @classmethod
    def from_gram(cls, X: Tensor) -> Self:
        return cls(X.shape[1], {"mat": X.T @ X})

    def _from_inner_identity(self) -> Self:
        mat = self._tensors["mat"]
        return type(self)._trusted(self._dim, {"mat": mat.T @ mat})

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
