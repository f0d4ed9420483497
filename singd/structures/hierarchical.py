"""Hierarchical factors ``hierarchical{K1}_{K2}``: two dense corners joined by a diagonal.

With rows and columns split into a top part t (K1), a middle part m (c = d - K1 - K2) and
a bottom part b (K2), the matrix is

    S = [[A, B_m, B_b],
         [0, diag(c), 0],
         [0, D,   E  ]]

with dense A (K1 x K1), B = [B_m, B_b] (K1 x (d - K1)), D (K2 x c), E (K2 x K2), storing
K1^2 + K1 (d - K1) + c + K2 c + K2^2 entries (``31 d - 255`` for hierarchical15_15 and
d > 30). Small dimensions fill A first (d <= K1: only A), then B and E (d <= K1 + K2:
no middle part), as the reference does.

``P(M)``: A = M_tt, E = M_bb, the middle diagonal of M, and the one-sided off-diagonal
blocks folded: B = M_t,mb + M_mb,t^T, D = M_bm + M_mb^T.

``from_inner2`` (not on the optimizer's path) and ``extreme_singular_values`` (a probe's
diagnostic) use the base class's fallbacks: structured products on the dense d x d input,
and singular values of the dense matrix in float64.
"""

from __future__ import annotations

import re
from typing import ClassVar, Self

import torch
from torch import Tensor

from singd.structures.base import StructuredMatrix, stored_frobenius_norm


class HierarchicalMatrix(StructuredMatrix):
    """The hierarchical structure; every operation costs O(d (K1 + K2)) per column.

    Stored tensors: ``A`` (K1, K1), ``B`` (K1, d - K1), ``C`` (c,), ``D`` (K2, c),
    ``E`` (K2, K2), with the sizes of :meth:`split_sizes`.

    Attributes:
        k1: The largest top-left block size K1, set by ``get_structure``.
        k2: The largest bottom-right block size K2, set by ``get_structure``.
    """

    k1: ClassVar[int]
    k2: ClassVar[int]

    @classmethod
    def split_sizes(cls, dim: int) -> tuple[int, int, int]:
        """``(K1, c, K2)`` actually used for dimension ``dim``."""
        if dim <= cls.k1:
            return dim, 0, 0
        if dim <= cls.k1 + cls.k2:
            return cls.k1, 0, dim - cls.k1
        return cls.k1, dim - cls.k1 - cls.k2, cls.k2

    @classmethod
    def tensor_shapes(cls, dim: int) -> dict[str, tuple[int, ...]]:
        t, m, b = cls.split_sizes(dim)
        return {"A": (t, t), "B": (t, m + b), "C": (m,), "D": (b, m), "E": (b, b)}

    def _parts(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``A, B_m, B_b, C, D, E``."""
        x = self._tensors
        m = x["C"].shape[0]
        return x["A"], x["B"][:, :m], x["B"][:, m:], x["C"], x["D"], x["E"]

    def _new(self, A: Tensor, B: Tensor, C: Tensor, D: Tensor, E: Tensor) -> Self:
        return type(self)(self._dim, {"A": A, "B": B, "C": C, "D": D, "E": E})

    @classmethod
    def from_dense(cls, sym: Tensor) -> Self:
        dim = sym.shape[0]
        t, m, _ = cls.split_sizes(dim)
        mb = slice(t, dim)
        middle, bottom = slice(t, t + m), slice(t + m, dim)
        tensors = {
            "A": sym[:t, :t].clone(),
            "B": sym[:t, mb] + sym[mb, :t].T,
            "C": sym.diagonal()[middle].clone(),
            "D": sym[bottom, middle] + sym[middle, bottom].T,
            "E": sym[bottom, bottom].clone(),
        }
        return cls(dim, tensors)

    def to_dense(self) -> Tensor:
        A, _, _, C, D, E = self._parts()
        t, m = A.shape[0], C.shape[0]
        out = torch.block_diag(A, torch.diag(C), E)
        out[:t, t:] = self._tensors["B"]
        out[t + m :, t : t + m] = D
        return out

    def _split_rows(self, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t, m, b = self.split_sizes(self._dim)
        return X[:t], X[t : t + m], X[t + m :]

    # The thin blocks act through two GEMMs with inner dimension d (S X) or K1 + K2
    # (S^T X) over the whole output, and the diagonal through one in-place pass: the
    # middle block is nearly all of the output, so the number of passes over it, not the
    # arithmetic, sets the cost. The output takes X's layout (empty_like), so that for a
    # transposed X, as in the natural gradient, the diagonal pass reads and writes in
    # the same order (a strided pass is ~10x slower); the few K1 or K2 rows are computed
    # apart and copied in, since GEMMs into a row slice of that layout are slow.
    def _matmat(self, X: Tensor) -> Tensor:
        A, _, _, C, D, E = self._parts()
        t, m, _ = self.split_sizes(self._dim)
        out = torch.empty_like(X)
        # rows t: [A | B] X; rows b: [D | E] X[t:]; rows m: c * X_m
        out[:t] = torch.cat([A, self._tensors["B"]], 1) @ X
        out[t + m :] = torch.cat([D, E], 1) @ X[t:]
        torch.mul(C.unsqueeze(1), X[t : t + m], out=out[t : t + m])
        return out

    def _rmatmat(self, X: Tensor) -> Tensor:
        A, _, _, C, _, _ = self._parts()
        t, m, _ = self.split_sizes(self._dim)
        X_t, X_m, X_b = self._split_rows(X)
        out = torch.empty_like(X)
        out[:t] = A.T @ X_t
        # rows m and b: B^T X_t + [D | E]^T X_b in one GEMM, then the diagonal c * X_m.
        torch.mm(self._thin().T, torch.cat([X_t, X_b], 0), out=out[t:])
        out[t : t + m].addcmul_(C.unsqueeze(1), X_m)
        return out

    def _right_matmat(self, X: Tensor) -> Tensor:
        # X S on X's own (n, d) layout, the same two GEMMs and one diagonal pass.
        A, _, _, C, _, _ = self._parts()
        t, m, _ = self.split_sizes(self._dim)
        X_t, X_m, X_b = X[:, :t], X[:, t : t + m], X[:, t + m :]
        rest = torch.cat([X_t, X_b], 1) @ self._thin()
        rest[:, :m].addcmul_(X_m, C)
        return torch.cat([X_t @ A, rest], 1)

    def outer_matmat_(self, X: Tensor) -> Tensor:
        """``X <- S S^T X`` in X's own memory (d x n, any layout); returns X.

        ``S S^T`` is an arrowhead matrix: dense in the K1 + K2 rows and columns t, b and
        ``diag(c^2)`` in the middle block (the middle rows of S are ``c_i e_i^T``). So the
        rows t, b of the result are one GEMM with the K1 + K2 rows ``(S S^T)_tb`` (inner
        dimension d), and the middle rows ``c^2 X_m + (S S^T)_m,tb X_tb``, written in place
        by a scaling and an ``addmm_`` (inner dimension K1 + K2). Against ``S (S^T X)`` this
        is the same arithmetic but no d x n temporary: on the CPU each fresh temporary of
        the natural gradient's size costs new pages, more than its arithmetic.
        """
        t, m, _ = self.split_sizes(self._dim)
        C = self._tensors["C"]
        rows = torch.zeros(self._dim - m, self._dim, dtype=C.dtype, device=C.device)
        rows[:t] = torch.cat([self._tensors["A"], self._tensors["B"]], 1)
        rows[t:, t:] = torch.cat([self._tensors["D"], self._tensors["E"]], 1)
        outer_tb = self._matmat(rows.T).T  # (S S^T)_tb = (S S_tb^T)^T
        top = outer_tb @ X
        X_m = X[t : t + m]
        X_m.mul_((C * C).unsqueeze(1))
        X_m.addmm_(outer_tb[:, t : t + m].T, torch.cat([X[:t], X[t + m :]]))
        X[:t] = top[:t]
        X[t + m :] = top[t:]
        return X

    def _thin(self) -> Tensor:
        """``[[B], [D | E]]`` of shape (K1 + K2, d - K1): the rows of S^T beyond K1 that
        are not the diagonal, as one matrix."""
        _, _, _, _, D, E = self._parts()
        return torch.cat([self._tensors["B"], torch.cat([D, E], 1)], 0)

    def _matmul_structured(self, other: Self) -> Self:
        A, B_m, B_b, C, D, E = self._parts()
        A2, B2_m, B2_b, C2, D2, E2 = other._parts()
        B_new = torch.cat([A @ B2_m + B_m * C2 + B_b @ D2, A @ B2_b + B_b @ E2], 1)
        return self._new(A @ A2, B_new, C * C2, D * C2 + E @ D2, E @ E2)

    @classmethod
    def from_gram(cls, X: Tensor) -> Self:
        dim = X.shape[1]
        t, m, _ = cls.split_sizes(dim)
        X_t, X_m, X_b = X[:, :t], X[:, t : t + m], X[:, t + m :]
        tensors = {
            "A": X_t.T @ X_t,
            "B": 2 * (X_t.T @ X[:, t:]),
            "C": (X_m * X_m).sum(0),
            "D": 2 * (X_b.T @ X_m),
            "E": X_b.T @ X_b,
        }
        return cls(dim, tensors)

    def _from_inner_identity(self) -> Self:
        # The columns of S are [A; 0; 0], [B_m; diag(c); D], [B_b; 0; E].
        A, B_m, B_b, C, D, E = self._parts()
        return self._new(
            A.T @ A,
            2 * (A.T @ self._tensors["B"]),
            C * C + (B_m * B_m).sum(0) + (D * D).sum(0),
            2 * (B_b.T @ B_m + E.T @ D),
            B_b.T @ B_b + E.T @ E,
        )

    def diag_add_(self, value: float | Tensor) -> Self:
        A, _, _, C, _, E = self._parts()
        A.diagonal().add_(value)
        C.add_(value)
        E.diagonal().add_(value)
        return self

    def diagonal(self) -> Tensor:
        A, _, _, C, _, E = self._parts()
        return torch.cat([A.diagonal(), C, E.diagonal()])

    def frobenius_norm(self) -> Tensor:
        return stored_frobenius_norm(self._tensors)


HierarchicalMatrixTemplate = HierarchicalMatrix
"""The published package's name for the template of ``Hierarchical{K1}_{K2}Matrix``."""

_PUBLISHED_NAME = re.compile(r"Hierarchical(\d+)_(\d+)Matrix")


def __getattr__(name: str) -> type[HierarchicalMatrix]:
    """``Hierarchical{K1}_{K2}Matrix`` for any K1, K2, the published package's class names
    (such as ``Hierarchical15_15Matrix``): the class of ``get_structure`` for the name
    ``hierarchical{K1}_{K2}``."""
    if match := _PUBLISHED_NAME.fullmatch(name):
        from singd.structures.registry import get_structure  # the registry imports us

        return get_structure(f"hierarchical{match.group(1)}_{match.group(2)}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
