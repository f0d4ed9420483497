"""The abstract structured matrix that SINGD's Kronecker factors K, C, m_K, m_C use.

A structure is a set of d x d matrices closed under addition, scaling and
multiplication (a matrix group once restricted to invertible members), described by a
few stored tensors. A subclass must say which tensors it stores
(:meth:`StructuredMatrix.tensor_shapes`), how to project a dense matrix onto the
structure (:meth:`StructuredMatrix.from_dense`) and how to expand itself
(:meth:`StructuredMatrix.to_dense`). Every other operation has a correct dense fallback
here, which a subclass overrides to exploit its structure; the fallbacks exist so that a
new structure is right before it is fast.

Projection semantics (REFERENCE.md, used by every subclass): ``P(M)`` keeps the entries
the structure stores; a dense diagonal block is kept as it is, an off-diagonal block that
the structure stores on one side only receives the upper part plus the transpose of the
lower part (``2 M_ij`` for symmetric ``M``), and a diagonal shared by a Toeplitz
structure receives the mean of the matching lower diagonal plus the mean of the matching
upper diagonal.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar, Self

import torch
import torch.distributed as dist
from torch import Tensor


class StructuredMatrix(ABC):
    """A d x d matrix stored through a few tensors that exploit its structure.

    Attributes:
        name: The spec name users write (``dense``, ``block30diagonal``, ...).
    """

    name: ClassVar[str]

    def __init__(self, dim: int, tensors: dict[str, Tensor]) -> None:
        """Wrap stored tensors (used as they are, not copied).

        Args:
            dim: The matrix dimension d (>= 1).
            tensors: The stored tensors, keyed and shaped as ``tensor_shapes(dim)``.

        Raises:
            ValueError: If ``dim`` is not positive or the tensors do not match the layout.
        """
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"A structured matrix needs a positive integer dim, got {dim!r}.")
        expected = self.tensor_shapes(dim)
        if set(tensors) != set(expected):
            raise ValueError(
                f"{self.name} of dim {dim} stores tensors {sorted(expected)}, "
                f"got {sorted(tensors)}."
            )
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise ValueError(
                    f"{self.name} of dim {dim} stores {key!r} with shape {shape}, "
                    f"got {tuple(tensors[key].shape)}."
                )
        dtypes = {t.dtype for t in tensors.values()}
        if len(dtypes) != 1:
            raise ValueError(f"{self.name}: all stored tensors must share one dtype, got {dtypes}.")
        self._dim = dim
        self._tensors = {key: tensors[key] for key in expected}

    @classmethod
    def _trusted(cls, dim: int, tensors: dict[str, Tensor]) -> Self:
        """Wrap tensors that a structure's own operation made, without the checks of
        ``__init__``: they have the layout by construction (keys in ``tensor_shapes``
        order, shapes, one dtype). The checks cost a few microseconds per matrix, and
        a SINGD step makes about 18 matrices per layer."""
        matrix = cls.__new__(cls)
        matrix._dim = dim
        matrix._tensors = tensors
        return matrix

    # ----------------------------------------------------------------------------------
    # What a subclass must provide
    # ----------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def tensor_shapes(cls, dim: int) -> dict[str, tuple[int, ...]]:
        """The stored tensors' names and shapes for dimension ``dim``."""

    @classmethod
    @abstractmethod
    def from_dense(cls, sym: Tensor) -> Self:
        """Project a dense (symmetric) d x d matrix onto the structure: ``P(sym)``."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """The represented d x d matrix, in the stored dtype."""

    # ----------------------------------------------------------------------------------
    # Storage
    # ----------------------------------------------------------------------------------
    @classmethod
    def storage_entries(cls, dim: int) -> int:
        """Number of entries stored for dimension ``dim`` (a count, not bytes)."""
        return sum(math.prod(shape) for shape in cls.tensor_shapes(dim).values())

    @property
    def dim(self) -> int:
        """The matrix dimension d."""
        return self._dim

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored tensors."""
        return next(iter(self._tensors.values())).dtype

    @property
    def device(self) -> torch.device:
        """The device of the stored tensors."""
        return next(iter(self._tensors.values())).device

    @property
    def num_entries(self) -> int:
        """Entries this instance stores (count)."""
        return sum(t.numel() for t in self._tensors.values())

    @property
    def nbytes(self) -> int:
        """Bytes this instance stores (B): entries times the element size."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors themselves (live, not copies): for state dicts, all-reduce
        and memory accounting. Plain tensors only, so ``torch.load(weights_only=True)``
        reads them back."""
        return dict(self._tensors)

    @classmethod
    def from_tensors(cls, dim: int, tensors: dict[str, Tensor]) -> Self:
        """Rebuild from :meth:`tensors` (the tensors are used, not copied)."""
        return cls(dim, dict(tensors))

    @classmethod
    def zeros(
        cls, dim: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Self:
        """The zero matrix."""
        return cls(
            dim,
            {
                key: torch.zeros(shape, dtype=dtype, device=device)
                for key, shape in cls.tensor_shapes(dim).items()
            },
        )

    @classmethod
    def eye(
        cls, dim: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Self:
        """The identity matrix."""
        return cls.zeros(dim, dtype=dtype, device=device).diag_add_(1.0)

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Self:
        """A copy in another dtype and/or on another device (always a new object)."""
        return type(self)._trusted(
            self._dim,
            {k: t.to(dtype=dtype, device=device, copy=True) for k, t in self._tensors.items()},
        )

    def clone(self) -> Self:
        """A deep copy."""
        return type(self)._trusted(self._dim, {k: t.clone() for k, t in self._tensors.items()})

    def __reduce__(self) -> tuple:
        # Classes such as Block30DiagonalMatrix are made on demand by get_structure, so
        # pickle by structure name rather than by class path.
        return _rebuild, (self.name, self._dim, self._tensors)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self._dim}, dtype={self.dtype}, device={self.device})"

    # ----------------------------------------------------------------------------------
    # In-place arithmetic: linear in the stored tensors for every structure
    # ----------------------------------------------------------------------------------
    def add_(self, other: StructuredMatrix, alpha: float | Tensor = 1.0) -> Self:
        """``S <- S + alpha T`` for ``T`` of the same structure and dim; returns self.

        A tensor ``alpha`` (0-d) stays on the device: nothing waits to read it.
        """
        self._check_same(other)
        theirs = [other._tensors[key] for key in self._tensors]
        if other.dtype != self.dtype:
            theirs = [t.to(self.dtype) for t in theirs]
        add_scaled_(list(self._tensors.values()), theirs, alpha)
        return self

    def add_product_(
        self,
        other: StructuredMatrix,
        alpha: float | Tensor = 1.0,
        spent: StructuredMatrix | None = None,
    ) -> Self:
        """``S <- S + alpha S T`` for ``T`` of the same structure, dim and dtype; returns
        self. SINGD's factor step ``K <- K (I - beta1 m_K)``. The fallback forms ``S @ T``
        and adds it; a structure may add the product's blocks without copying them, or
        form it in ``spent`` (a matrix of the same structure and dim that the caller no
        longer needs: its storage may be overwritten).
        """
        return self.add_(self @ other, alpha=alpha)

    def mul_(self, value: float | Tensor) -> Self:
        """``S <- value S``; returns self. A tensor ``value`` (0-d) is not read."""
        mine = list(self._tensors.values())
        torch._foreach_mul_(mine, value)
        mark_changed(mine)
        return self

    def diag_add_(self, value: float | Tensor) -> Self:
        """``S <- S + value I``; returns self. Dense fallback, overridden for speed."""
        dense = self.to_dense()
        dense.diagonal().add_(value)
        self._assign(type(self).from_dense(dense))
        return self

    # ----------------------------------------------------------------------------------
    # Products
    # ----------------------------------------------------------------------------------
    def __matmul__(self, other: Tensor | StructuredMatrix) -> Tensor | Self:
        """``S @ X`` for a d x n tensor (a tensor, in the stored dtype), or ``S @ T`` for
        ``T`` of the same structure (a structured matrix: the structures are closed under
        multiplication)."""
        if isinstance(other, StructuredMatrix):
            self._check_same(other)
            return self._matmul_structured(other)
        self._check_operand(other)
        return self._matmat(other.to(self.dtype))

    def rmatmat(self, X: Tensor) -> Tensor:
        """``S^T @ X`` for a d x n tensor, in the stored dtype."""
        self._check_operand(X)
        return self._rmatmat(X.to(self.dtype))

    def outer_matmat_(self, X: Tensor) -> Tensor:
        """``S S^T X`` for a d x n tensor in the stored dtype, in the stored dtype.

        May work in X's own memory and return it: a caller hands X over (its own copy)
        and must not read X afterwards, only the result. The fallback is ``S (S^T X)``,
        with two temporaries of X's size; a structure that can apply ``S S^T`` in place
        overrides it (SINGD's natural gradient, whose X is the size of a gradient).
        """
        return self @ self.rmatmat(X)

    def _matmat(self, X: Tensor) -> Tensor:
        return self.to_dense() @ X

    def _rmatmat(self, X: Tensor) -> Tensor:
        return self.to_dense().T @ X

    def _matmul_structured(self, other: Self) -> Self:
        return type(self).from_dense(self.to_dense() @ other.to_dense())

    def _right_matmat(self, X: Tensor) -> Tensor:
        """``X @ S`` for an n x d tensor: ``(S^T X^T)^T``."""
        return self._rmatmat(X.T).T

    # ----------------------------------------------------------------------------------
    # Projections of inner products (the SINGD curvature terms)
    # ----------------------------------------------------------------------------------
    @classmethod
    def from_gram(cls, X: Tensor) -> Self:
        """``P(X^T X)`` for ``X`` of shape (n, d). Dense fallback, overridden for speed."""
        return cls.from_dense(X.T @ X)

    def from_inner(self, X: Tensor | None = None) -> Self:
        """``P(S^T X X^T S)`` for ``X`` of shape (d, n); ``P(S^T S)`` when X is None.

        The published package's signature and convention: ``X`` holds one column per
        row of data (the optimizer passes ``a^T`` for rows ``a``). With ``Y = X^T S`` this
        is ``P(Y^T Y)``, so it costs one right product and one structured Gram projection.
        """
        if X is None:
            return self._from_inner_identity()
        rows = _rows_of(X, self._dim)
        return type(self).from_gram(self._right_matmat(rows.to(self.dtype)))

    def _from_inner_identity(self) -> Self:
        dense = self.to_dense()
        return type(self).from_dense(dense.T @ dense)

    def from_inner2(self, XXT: Tensor) -> Self:
        """``P(S^T XXT S)`` for a symmetric d x d ``XXT``.

        The fallback computes ``XXT S = (S^T XXT)^T`` and then ``S^T (XXT S)`` with the
        structure's own products: its input is already dense d x d, so its intermediates
        are d x d too (never larger), and no d^3 dense product is formed.
        """
        self._check_operand(XXT)
        A = XXT.to(self.dtype)
        return type(self).from_dense(self._rmatmat(self._rmatmat(A).T))

    # ----------------------------------------------------------------------------------
    # Reductions
    # ----------------------------------------------------------------------------------
    def diagonal(self) -> Tensor:
        """The diagonal of the represented matrix (length d)."""
        return self.to_dense().diagonal().clone()

    def average_trace(self) -> Tensor:
        """``trace(S) / d`` as a 0-dim tensor in the stored dtype."""
        return self.diagonal().mean()

    def infinity_vector_norm(self) -> Tensor:
        """The largest absolute stored entry (= largest absolute matrix entry for every
        structure here), 0-dim tensor."""
        return torch.stack([t.abs().max() for t in self._tensors.values() if t.numel() > 0]).max()

    def frobenius_norm(self) -> Tensor:
        """``||S||_F`` of the represented matrix. Dense fallback, overridden for speed."""
        return torch.linalg.vector_norm(self.to_dense())

    def extreme_singular_values(self) -> tuple[Tensor, Tensor]:
        """``(sigma_max, sigma_min)`` as float64 0-dim tensors.

        The fallback computes the singular values of the dense matrix in float64 (an
        O(d^3) diagnostic, run at a probe's cadence, never by the optimizer). A matrix
        with a non-finite entry gives ``(nan, nan)``: its singular values are undefined.
        """
        if not self._all_finite():
            nan = torch.tensor(float("nan"), dtype=torch.float64)
            return nan, nan.clone()
        return _extremes(torch.linalg.svdvals(self.to_dense().to(torch.float64).cpu()))

    def _all_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self._tensors.values())

    # ----------------------------------------------------------------------------------
    # Distributed
    # ----------------------------------------------------------------------------------
    def all_reduce(
        self,
        op: dist.ReduceOp.RedOpType = dist.ReduceOp.AVG,
        group: dist.ProcessGroup | None = None,
    ) -> Self:
        """Reduce every stored tensor across processes, in place; returns self.

        All stored tensors travel in one flat buffer (one collective per matrix). Gloo has
        no AVG reduction, so AVG on a non-NCCL backend is a SUM divided by the group size.
        """
        buffer = torch.cat([t.reshape(-1) for t in self._tensors.values()])
        average_by_hand = op == dist.ReduceOp.AVG and dist.get_backend(group) != "nccl"
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM if average_by_hand else op, group=group)
        if average_by_hand:
            buffer.div_(dist.get_world_size(group))
        offset = 0
        for tensor in self._tensors.values():
            tensor.copy_(buffer[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
        return self

    # ----------------------------------------------------------------------------------
    # The rest of the published singd 0.0.5 interface (out-of-place and by-name forms)
    # ----------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        """``(d, d)``, as a tensor's shape."""
        return torch.Size((self._dim, self._dim))

    def named_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """The stored tensors with their names (live, not copies), as the published
        package yields them; the names are ours (see :meth:`tensor_shapes`)."""
        yield from self._tensors.items()

    @classmethod
    def from_mat_inner(cls, X: Tensor) -> Self:
        """``P(X X^T)`` for ``X`` of shape (d, n): :meth:`from_gram` of ``X^T``."""
        if X.ndim != 2:
            raise ValueError(f"from_mat_inner expects a matrix (d, n), got {tuple(X.shape)}.")
        return cls.from_gram(X.T)

    def __add__(self, other: StructuredMatrix) -> Self:
        """``S + T`` for ``T`` of the same structure and dim (a new matrix)."""
        return self.clone().add_(other)

    def __mul__(self, value: float | Tensor) -> Self:
        """``value S`` (a new matrix)."""
        return self.clone().mul_(value)

    __rmul__ = __mul__

    # ----------------------------------------------------------------------------------
    # Helpers
    # ----------------------------------------------------------------------------------
    def _assign(self, other: StructuredMatrix) -> None:
        """Copy another instance's values into this one's tensors (in place)."""
        for key, tensor in self._tensors.items():
            tensor.copy_(other._tensors[key])

    def _check_same(self, other: StructuredMatrix) -> None:
        if type(other) is not type(self) or other.dim != self._dim:
            raise ValueError(
                f"Expected a {self.name} matrix of dim {self._dim}, "
                f"got {getattr(other, 'name', type(other).__name__)} of dim "
                f"{getattr(other, 'dim', '?')}."
            )

    def _check_operand(self, X: Tensor) -> None:
        if X.ndim != 2 or X.shape[0] != self._dim:
            raise ValueError(
                f"{self.name} of dim {self._dim} multiplies tensors of shape "
                f"({self._dim}, n), got {tuple(X.shape)}."
            )


def _rows_of(X: Tensor, dim: int) -> Tensor:
    """``X^T`` (a view) for the ``X`` of `StructuredMatrix.from_inner`, shape checked."""
    if X.ndim != 2 or X.shape[0] != dim:
        raise ValueError(f"from_inner expects X of shape ({dim}, n), got {tuple(X.shape)}.")
    return X.T


def _rebuild(name: str, dim: int, tensors: dict[str, Tensor]) -> StructuredMatrix:
    """Unpickle a structured matrix (see ``StructuredMatrix.__reduce__``)."""
    from singd.structures.registry import get_structure  # the registry imports this module

    return get_structure(name).from_tensors(dim, tensors)


def _extremes(singular_values: Tensor) -> tuple[Tensor, Tensor]:
    return singular_values.max(), singular_values.min()


def stored_frobenius_norm(tensors: dict[str, Tensor]) -> Tensor:
    """``||S||_F`` for structures whose stored entries are exactly the matrix entries: the
    norm of the per-tensor norms, so nothing is copied and nothing squared overflows.

    Both norms run in float32 (float64 for float64) and the result is rounded to the
    stored dtype once: in float16, rounding each per-tensor norm first put the result
    one unit in the last place away from the correctly rounded norm.
    """
    dtype = next(iter(tensors.values())).dtype
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    norms = torch.stack([torch.linalg.vector_norm(t, dtype=wide) for t in tensors.values()])
    return torch.linalg.vector_norm(norms).to(dtype)


def add_scaled_(mine: list[Tensor], theirs: list[Tensor], alpha: float | Tensor) -> None:
    """``mine[i] += alpha * theirs[i]`` for every i, in one foreach call (these are small
    tensors: the per-call overhead dominates); a tensor ``alpha`` (0-d) is not read."""
    if isinstance(alpha, Tensor):
        torch._foreach_add_(mine, torch._foreach_mul(theirs, alpha))
    else:
        torch._foreach_add_(mine, theirs, alpha=alpha)
    mark_changed(mine)


def mark_changed(tensors: list[Tensor]) -> None:
    """Bump the version counters of tensors that foreach operations changed in place.

    torch's in-place foreach operations bump them themselves, except under a Python
    dispatch mode (a ``TorchDispatchMode``: FlopCounterMode, memory trackers,
    `probes.tensor_memory.TensorPeak`), where they do not. Caches kept by version
    (hierarchical factors' dense rows, SINGD's diagonal squares) would then serve stale
    values; a counter bumped twice only says "changed" twice.
    """
    for t in tensors:  # one by one: older torch releases take a single tensor only
        torch.autograd.graph.increment_version(t)
