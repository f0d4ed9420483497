"""Block-diagonal factors ``block{N}diagonal``: dense N x N blocks, the last one smaller.

Unlike the reference implementation, no block is assumed symmetric: K and C stop being
symmetric after their first update, so ``S^T X`` transposes every block and
``from_inner()`` is ``P(S^T S)`` (REFERENCE.md, gap 1).
"""

from __future__ import annotations

import re
from typing import ClassVar, Self

import torch
from torch import Tensor

from singd.structures.base import StructuredMatrix, stored_frobenius_norm
from singd.structures.dense import dense_outer_matmat, symmetric_gram


class BlockDiagonalMatrix(StructuredMatrix):
    """``S = blockdiag(S_1, ..., S_q, L)`` with ``q = floor(d / N)`` dense N x N blocks and
    a last block of size ``d mod N`` (empty when N divides d).

    ``P(M)`` keeps the diagonal blocks of ``M`` as they are. Every operation works block by
    block (batched), so its cost is O(d N) per column instead of O(d^2).

    Stored tensors: ``blocks`` (q, N, N), ``last`` (d mod N, d mod N).

    Attributes:
        block_size: N, set by :func:`singd.structures.get_structure`.
    """

    block_size: ClassVar[int]

    @classmethod
    def tensor_shapes(cls, dim: int) -> dict[str, tuple[int, ...]]:
        count, rest = divmod(dim, cls.block_size)
        return {"blocks": (count, cls.block_size, cls.block_size), "last": (rest, rest)}

    @classmethod
    def _split(cls, X: Tensor) -> tuple[Tensor, Tensor]:
        """Rows of a (d, n) tensor as (q, N, n) block rows and the (d mod N, n) rest."""
        dim = X.shape[0]
        count = dim // cls.block_size
        head = X[: count * cls.block_size]
        return head.reshape(count, cls.block_size, *X.shape[1:]), X[count * cls.block_size :]

    @classmethod
    def from_dense(cls, sym: Tensor) -> Self:
        dim = sym.shape[0]
        count = dim // cls.block_size
        head = sym[: count * cls.block_size, : count * cls.block_size]
        index = torch.arange(count, device=sym.device)
        blocks = head.reshape(count, cls.block_size, count, cls.block_size)[index, :, index, :]
        last = sym[count * cls.block_size :, count * cls.block_size :]
        return cls(dim, {"blocks": blocks.clone(), "last": last.clone()})

    def to_dense(self) -> Tensor:
        return torch.block_diag(*self._tensors["blocks"].unbind(0), self._tensors["last"])

    def _blockwise(self, blocks: Tensor, last: Tensor, X: Tensor) -> Tensor:
        """Each row block of X (d, n) times its block, into one preallocated output."""
        if blocks.shape[0] == 0:
            # One block covers the whole factor: the dense product, bit for bit the
            # dense structure's result (REFERENCE.md gap 1 promises exactly dense).
            return last @ X
        head, rest = self._split(X)
        out = X.new_empty(X.shape)
        out_head, out_rest = self._split(out)
        torch.bmm(blocks, head, out=out_head)
        torch.mm(last, rest, out=out_rest)
        return out

    def _matmat(self, X: Tensor) -> Tensor:
        return self._blockwise(self._tensors["blocks"], self._tensors["last"], X)

    def _rmatmat(self, X: Tensor) -> Tensor:
        return self._blockwise(self._tensors["blocks"].mT, self._tensors["last"].T, X)

    def _right_matmat(self, X: Tensor) -> Tensor:
        if self._tensors["blocks"].shape[0] == 0:
            return X @ self._tensors["last"]  # as dense, bit for bit (see _blockwise)
        return self._rmatmat(X.T).T

    def outer_matmat_(self, X: Tensor) -> Tensor:
        if self._tensors["blocks"].shape[0] == 0:
            return dense_outer_matmat(self._tensors["last"], X)  # as dense, bit for bit
        return super().outer_matmat_(X)

    def _matmul_structured(self, other: Self) -> Self:
        return type(self)(
            self._dim,
            {
                "blocks": torch.bmm(self._tensors["blocks"], other._tensors["blocks"]),
                "last": self._tensors["last"] @ other._tensors["last"],
            },
        )

    @classmethod
    def from_gram(cls, X: Tensor) -> Self:
        head, rest = cls._split(X.T)  # (q, N, n), (r, n)
        # The last block's Gram as dense computes it: one block is bit for bit dense.
        return cls(X.shape[1], {"blocks": torch.bmm(head, head.mT), "last": symmetric_gram(rest.T)})

    def _from_inner_identity(self) -> Self:
        blocks, last = self._tensors["blocks"], self._tensors["last"]
        return type(self)(
            self._dim, {"blocks": torch.bmm(blocks.mT, blocks), "last": symmetric_gram(last)}
        )

    def from_inner2(self, XXT: Tensor) -> Self:
        """``P(S^T A S)``: block i is ``S_i^T A_ii S_i``, so only A's diagonal blocks are read."""
        self._check_operand(XXT)
        diagonal_blocks = type(self).from_dense(XXT.to(self.dtype))
        inner = diagonal_blocks._tensors
        blocks, last = self._tensors["blocks"], self._tensors["last"]
        return type(self)(
            self._dim,
            {
                "blocks": torch.bmm(torch.bmm(blocks.mT, inner["blocks"]), blocks),
                "last": last.T @ inner["last"] @ last,
            },
        )

    def diag_add_(self, value: float | Tensor) -> Self:
        self._tensors["blocks"].diagonal(dim1=1, dim2=2).add_(value)
        self._tensors["last"].diagonal().add_(value)
        return self

    def diagonal(self) -> Tensor:
        return torch.cat(
            [
                self._tensors["blocks"].diagonal(dim1=1, dim2=2).reshape(-1),
                self._tensors["last"].diagonal(),
            ]
        )

    def frobenius_norm(self) -> Tensor:
        return stored_frobenius_norm(self._tensors)

    def extreme_singular_values(self) -> tuple[Tensor, Tensor]:
        """Exact, per block: the singular values of a block-diagonal matrix are those of
        its blocks, so the cost is O(d N^2) in float64, never a d x d decomposition."""
        if not self._all_finite():
            return super().extreme_singular_values()
        values = [
            torch.linalg.svdvals(t.to(torch.float64).cpu()).reshape(-1)
            for t in self._tensors.values()
            if t.numel() > 0
        ]
        values = torch.cat(values)
        return values.max(), values.min()


BlockDiagonalMatrixTemplate = BlockDiagonalMatrix
"""The published package's name for the template of ``Block{N}DiagonalMatrix``."""

_PUBLISHED_NAME = re.compile(r"Block(\d+)DiagonalMatrix")


def __getattr__(name: str) -> type[BlockDiagonalMatrix]:
    """``Block{N}DiagonalMatrix`` for any N, the published package's class names (such as
    ``Block30DiagonalMatrix``): the class ``get_structure("block{N}diagonal")`` returns."""
    if match := _PUBLISHED_NAME.fullmatch(name):
        from singd.structures.registry import get_structure  # the registry imports us

        return get_structure(f"block{match.group(1)}diagonal")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
