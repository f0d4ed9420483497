"""Read-only views of a Kronecker optimizer's per-layer state under the attribute names of
the published singd 0.0.5 (``optimizer.Ks[name]``, ``optimizer.m_Cs[name]``, ...).

A view holds no tensors and copies nothing: every lookup reads the optimizer's current
state, so it costs nothing in a step and adds nothing to the state's bytes, and it
follows the state through steps and ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from singd.optim.base import KroneckerOptimizer


class FactorView(Mapping[str, Any]):
    """Layer name -> one named entry (``"K"``, ``"m_C"``, ``"H_K"``, ...) of its state.

    Lists the layers whose state holds the entry now (``m_K`` is absent when alpha1 = 0,
    ``H_K`` between a step and the next backward pass), in the optimizer's layer order.
    """

    def __init__(self, optimizer: KroneckerOptimizer, key: str) -> None:
        """View ``optimizer``'s entry ``key`` of every layer."""
        self._optimizer = optimizer
        self._key = key

    def __getitem__(self, name: str) -> Any:
        state = self._optimizer._factors.get(name, {})
        if self._key not in state:
            raise KeyError(name)
        return state[self._key]

    def __iter__(self) -> Iterator[str]:
        factors = self._optimizer._factors
        return iter(
            [
                layer.name
                for layer in self._optimizer._layers
                if self._key in factors.get(layer.name, {})
            ]
        )

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"FactorView({self._key!r}: {list(self)})"
