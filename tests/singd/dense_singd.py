"""SINGD's preconditioner update in plain dense float64 algebra (REFERENCE.md "The
update"): the reference that `test_functional` and `test_singd_equations` check against."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Projection = Callable[[Tensor], Tensor]


def dense_factor_update(
    K: Tensor,
    C: Tensor,
    m_K: Tensor,
    m_C: Tensor,
    H_K: Tensor,
    H_C: Tensor,
    P_K: Projection,
    P_C: Projection,
    hp: dict,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(K, C, m_K, m_C)`` after one update, from the curvature terms ``H_K``, ``H_C``;
    ``P_K``, ``P_C`` project onto the factors' structures; ``hp`` holds ``alpha1``,
    ``damping``, ``lr_cov``, ``kfac_like`` and ``normalize_lr_cov``."""
    KtK, CtC = P_K(K.T @ K), P_C(C.T @ C)
    c = 0.5 * ((1 - hp["alpha1"]) if hp["normalize_lr_cov"] else 1.0)
    avg = lambda M: torch.trace(M) / M.shape[0]  # noqa: E731
    I_K = torch.eye(K.shape[0], dtype=K.dtype)
    I_C = torch.eye(C.shape[0], dtype=C.dtype)
    lam = hp["damping"]
    if hp["kfac_like"]:
        new_m_K = c * (H_K + lam * KtK - I_K)
        new_m_C = c * (H_C + lam * CtC - I_C)
    else:
        new_m_K = c * (avg(H_C) * H_K + lam * avg(CtC) * KtK - I_K)
        new_m_C = c * (avg(H_K) * H_C + lam * avg(KtK) * CtC - I_C)
    new_m_K = new_m_K + hp["alpha1"] * m_K
    new_m_C = new_m_C + hp["alpha1"] * m_C
    beta_K = beta_C = hp["lr_cov"]
    if hp["normalize_lr_cov"]:
        beta_K /= max(1.0, new_m_K.abs().max().item())
        beta_C /= max(1.0, new_m_C.abs().max().item())
    return K @ (I_K - beta_K * new_m_K), C @ (I_C - beta_C * new_m_C), new_m_K, new_m_C
