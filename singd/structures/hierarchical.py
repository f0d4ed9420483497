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

from singd.structures.base import (
    StructuredMatrix,
    add_scaled_,
    mark_changed,
    stored_frobenius_norm,
)


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
        # Results of our own operations have the layout by construction: not re-checked.
        return type(self)._trusted(self._dim, {"A": A, "B": B, "C": C, "D": D, "E": E})

    @classmethod
    def _corner_only(cls, A: Tensor) -> dict[str, Tensor]:
        """The stored tensors of a matrix with d <= K1: only A, the others empty."""
        t = A.shape[0]
        return {
            "A": A,
            "B": A.new_empty(t, 0),
            "C": A.new_empty(0),
            "D": A.new_empty(0, 0),
            "E": A.new_empty(0, 0),
        }

    def _tb_rows(self) -> Tensor:
        """``W = S[t and b rows, :]``, the K1 + K2 dense rows of S as one (K1 + K2, d)
        matrix ``[[A, B_m, B_b], [0, D, E]]``; the middle rows of S are ``c_i e_i^T``.

        Every product with S is a GEMM with W plus one pass of the diagonal ``c``. W is
        kept until a stored tensor changes (their version counters say when): a SINGD
        step reads one K through W in the input hook, in ``from_inner()`` and, once
        updated, in the natural gradient and the next step's hook, so this builds W
        once per step instead of three times (four dispatches each).
        """
        x = self._tensors
        A, B, D, E = x["A"], x["B"], x["D"], x["E"]
        try:
            versions = (A._version, B._version, D._version, E._version)
        except RuntimeError:  # inference tensors keep no version counter: no cache
            return self._build_tb_rows()
        cached = getattr(self, "_rows_cache", None)
        if cached is not None and cached[0] == versions:
            return cached[1]
        W = self._build_tb_rows()
        self._rows_cache = (versions, W)
        return W

    def _build_tb_rows(self) -> Tensor:
        """`_tb_rows` made afresh, not kept (for a matrix used once, such as a momentum
        in `add_product_`: keeping its W would hold memory no state figure counts)."""
        x = self._tensors
        A, B, D, E = x["A"], x["B"], x["D"], x["E"]
        if E.shape[0] == 0:
            return torch.cat([A, B], 1)
        # Concatenations, not copies into slices of an empty W: a third of the dispatches.
        bottom = torch.cat([E.new_zeros(E.shape[0], A.shape[0]), D, E], 1)
        return torch.cat([torch.cat([A, B], 1), bottom])

    @classmethod
    def _tb_columns(cls, dim: int, device: torch.device) -> Tensor:
        """The indices of the t and b columns (or rows) for dimension ``dim``: one
        ``index_select`` gathers them where slicing and concatenating took three
        dispatches. Made once per dimension and device."""
        key = (dim, device)
        index = _TB_INDEX.get((cls.k1, cls.k2, *key))
        if index is None:
            t, m, _ = cls.split_sizes(dim)
            index = torch.cat([torch.arange(t), torch.arange(t + m, dim)]).to(device)
            _TB_INDEX[(cls.k1, cls.k2, *key)] = index
        return index

    @classmethod
    def _project_gram(cls, Y: Tensor, middle: Tensor | None = None) -> Self:
        """``P(Y^T Y)`` (plus ``diag(middle)`` on the middle block) for Y of shape (n, d).

        Rows t and b of ``Y^T Y`` are one GEMM ``[Y_t | Y_b]^T Y`` (the K1 + K2 rows the
        structure keeps beyond the diagonal), and the middle diagonal is the column sums
        of ``Y_m^2``.
        """
        dim = Y.shape[1]
        if dim <= cls.k1:  # only the dense corner A (a small layer's factor): one GEMM
            return cls._trusted(dim, cls._corner_only(Y.T @ Y))
        t, m, _ = cls.split_sizes(dim)
        Y_m = Y[:, t : t + m]
        Z = Y.index_select(1, cls._tb_columns(dim, Y.device)).T @ Y
        C = (Y_m * Y_m).sum(0)
        if middle is not None:
            C.add_(middle)
        A, B, D, E = _dense_blocks(Z, t, m)
        # B + B, not B * 2: the same bits without wrapping a Python number (3 us here).
        tensors = {"A": A.clone(), "B": B + B, "C": C, "D": D + D, "E": E.clone()}
        return cls._trusted(dim, tensors)

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
        # X S = [X_t | X_b] W + the middle columns c * X_m: one GEMM (inner dimension
        # K1 + K2) into the result and one pass of the diagonal over its middle columns.
        if self._dim <= self.k1:
            return X @ self._tensors["A"]
        return self._right_product(X, self._tb_rows())

    def _right_product(self, X: Tensor, W: Tensor) -> Tensor:
        """``X S`` (X of shape (n, d), d > K1) through S's dense rows ``W``."""
        t, m, _ = self.split_sizes(self._dim)
        out = X.index_select(1, self._tb_columns(self._dim, X.device)) @ W
        out[:, t : t + m].addcmul_(X[:, t : t + m], self._tensors["C"])
        return out

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
        if self._dim <= self.k1:  # S = A: two small GEMMs, no arrowhead bookkeeping
            A = self._tensors["A"]
            return A @ (A.T @ X)
        t, m, _ = self.split_sizes(self._dim)
        C = self._tensors["C"]
        W = self._tb_rows()
        index = self._tb_columns(self._dim, X.device)
        # (S S^T)_tb = W S^T: columns t, b are W W_tb^T (the tb columns of S^T are the
        # rows W), the middle columns W_m diag(c). Whole-index copies, not slice by slice.
        outer_tb = W.index_copy(1, index, W @ W.T)
        outer_m = outer_tb[:, t : t + m].mul_(C)
        top = outer_tb @ X
        X_m = X[t : t + m]
        X_m.mul_((C * C).unsqueeze(1))
        X_m.addmm_(outer_m.T, X.index_select(0, index))
        return X.index_copy_(0, index, top)

    def _thin(self) -> Tensor:
        """``[[B], [D | E]]`` of shape (K1 + K2, d - K1): the rows of S^T beyond K1 that
        are not the diagonal, as one matrix."""
        _, _, _, _, D, E = self._parts()
        return torch.cat([self._tensors["B"], torch.cat([D, E], 1)], 0)

    def _matmul_structured(self, other: Self) -> Self:
        if self._dim <= self.k1:
            return type(self)._trusted(
                self._dim, self._corner_only(self._tensors["A"] @ other._tensors["A"])
            )
        A, B, C, D, E = self._product_blocks(other)
        return self._new(A.clone(), B.clone(), C, D.clone(), E.clone())

    def _product_blocks(self, other: Self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The stored blocks ``A, B, C, D, E`` of ``S M`` (d > K1); all but C are views
        of one (K1 + K2, d) matrix.

        The dense rows of ``S M`` are ``W M``, one right product of S's rows W by M
        (a GEMM with inner dimension K1 + K2 and a pass of M's diagonal over the middle
        columns; its rows b are zero in the columns t), and its middle diagonal is
        ``c c_M``: 3 products where block by block took 9 small GEMMs and 7 sums.
        """
        t, m, _ = self.split_sizes(self._dim)
        rows = other._right_product(self._tb_rows(), other._build_tb_rows())
        A, B, D, E = _dense_blocks(rows, t, m)
        return A, B, self._tensors["C"] * other._tensors["C"], D, E

    def add_product_(
        self, other: Self, alpha: float | Tensor = 1.0, spent: Self | None = None
    ) -> Self:
        """``S <- S + alpha S M`` in place, with no copy of ``S M``'s blocks: one foreach
        addition of `_product_blocks`' views."""
        self._check_same(other)
        if self._dim <= self.k1:
            return super().add_product_(other, alpha)
        add_scaled_(list(self._tensors.values()), list(self._product_blocks(other)), alpha)
        return self

    @classmethod
    def from_gram(cls, X: Tensor) -> Self:
        return cls._project_gram(X)

    def _from_inner_identity(self) -> Self:
        # S^T S = W^T W + diag(c^2) on the middle block (the middle rows of S are c_i e_i^T).
        if self._dim <= self.k1:
            A = self._tensors["A"]
            return type(self)._trusted(self._dim, self._corner_only(A.T @ A))
        C = self._tensors["C"]
        return self._project_gram(self._tb_rows(), C * C)

    def diag_add_(self, value: float | Tensor) -> Self:
        x = self._tensors
        # One foreach dispatch for the three diagonal pieces (8 us instead of 14 here).
        torch._foreach_add_([x["A"].diagonal(), x["C"], x["E"].diagonal()], value)
        mark_changed([x["A"], x["C"], x["E"]])  # the W cache reads the versions
        return self

    def diagonal(self) -> Tensor:
        x = self._tensors  # not `_parts`, whose slices of B cost two dispatches
        return torch.cat([x["A"].diagonal(), x["C"], x["E"].diagonal()])

    def frobenius_norm(self) -> Tensor:
        return stored_frobenius_norm(self._tensors)


def _dense_blocks(Z: Tensor, t: int, m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The views ``A, B, D, E`` of a (K1 + K2, d) matrix laid out as `_tb_rows` (plain
    indexing: one dispatch per view, where `split` took 6 us for two)."""
    top, bottom = Z[:t], Z[t:]
    return top[:, :t], top[:, t:], bottom[:, t : t + m], bottom[:, t + m :]


_TB_INDEX: dict[tuple, Tensor] = {}
"""`HierarchicalMatrix._tb_columns` by (K1, K2, d, device)."""

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
