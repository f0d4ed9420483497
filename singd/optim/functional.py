"""The updates of the Kronecker optimizers as functions of tensors and structured matrices.

As ``torch.optim.adam`` has ``_single_tensor_adam``, the optimizers here are thin
stateful classes over these functions: the classes find the layers, collect the
curvature terms and keep the state; the maths is here, testable on its own against the
paper's equations in dense float64 algebra (`tests/singd/test_functional.py`).
Like torch's functional optimizers, these functions update their state arguments in
place and say which ones they consume.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from singd.optim.scaling import Scale, not_one
from singd.structures.base import StructuredMatrix
from singd.structures.dense import DenseMatrix


class SINGDFactors(NamedTuple):
    """A layer's SINGD factors after an update: ``K``, ``C`` and the new momenta."""

    K: StructuredMatrix
    C: StructuredMatrix
    m_K: StructuredMatrix  # noqa: N815 (the paper's symbol)
    m_C: StructuredMatrix  # noqa: N815


def singd_factor_update(
    K: StructuredMatrix,
    C: StructuredMatrix,
    m_K: StructuredMatrix | None,
    m_C: StructuredMatrix | None,
    H_K: StructuredMatrix,
    H_C: StructuredMatrix,
    *,
    lr_cov: float,
    alpha1: float,
    damping: float,
    kfac_like: bool,
    normalize_lr_cov: bool,
    scale_K: float = 1.0,
    scale_C: Scale = 1.0,
) -> SINGDFactors:
    """One SINGD preconditioner update (Lin et al., ICML 2024, Fig. 1; IKFAC, Fig. 2).

    With ``c = 0.5 (1 - alpha1)`` under ``normalize_lr_cov`` (else 0.5), ``avg(M) =
    trace(M) / dim``, ``H_K`` and ``H_C`` first multiplied by ``scale_K`` and
    ``scale_C``, and ``P`` the projection onto each factor's structure:

    - SINGD: ``m_K' = c (avg(H_C) H_K + lambda avg(P(C^T C)) P(K^T K) - I)``,
      ``m_C' = c (avg(H_K) H_C + lambda avg(P(K^T K)) P(C^T C) - I)``;
    - IKFAC (``kfac_like``): ``m_K' = c (H_K + lambda P(K^T K) - I)``, likewise ``m_C'``;
    - Riemannian momentum: ``m_K <- m_K' + alpha1 m_K`` (``m_K'`` itself when alpha1 = 0,
      and then ``m_K`` may be None);
    - ``K <- K (I - beta1 m_K)``, ``C <- C (I - beta1 m_C)``, the first-order truncation
      of ``K exp(-beta1 m_K)``; under ``normalize_lr_cov`` ``beta1`` is divided by
      ``max(1, max |entry of m|)``, for each factor apart.

    Args:
        K: Input-side factor (``d_K x d_K``), updated in place.
        C: Output-side factor (``d_C x d_C``), updated in place.
        m_K: Momentum of ``K`` (read when alpha1 != 0; not modified).
        m_C: Momentum of ``C`` (likewise).
        H_K: Input-side curvature term ``P(K^T a^T a K)``; consumed (becomes ``m_K``).
        H_C: Output-side curvature term ``P(C^T g^T g C)``; consumed (becomes ``m_C``).
        lr_cov: beta1, the factors' learning rate.
        alpha1: Riemannian momentum, in [0, 1).
        damping: lambda, >= 0.
        kfac_like: The IKFAC update.
        normalize_lr_cov: Normalised gradient descent on ``K`` and ``C``.
        scale_K: Factor on ``H_K`` (``1 / passes`` over accumulated backward calls).
        scale_C: Factor on ``H_C`` (the GradScaler un-scaling times the passes of a mean
            loss); a 0-d tensor stays on its device.

    Returns:
        ``K`` and ``C`` (the updated arguments) and the new momenta ``m_K``, ``m_C``
        (new objects, made from ``H_K`` and ``H_C``).
    """
    K_tK, C_tC = K.from_inner(), C.from_inner()
    c = 0.5 * ((1.0 - alpha1) if normalize_lr_cov else 1.0)
    # c is folded into the coefficients (for c = 0.5 that is exact: bit for bit the
    # same as scaling afterwards). SINGD's traces stay on the device, in float64 as
    # Python numbers would be: reading them would wait for every queued kernel.
    if kfac_like:
        coef_HK, coef_KK, coef_HC, coef_CC = c * scale_K, c * damping, c * scale_C, c * damping
    else:
        trace_HC, trace_CC, trace_HK, trace_KK = (
            M.average_trace().to(torch.float64) for M in (H_C, C_tC, H_K, K_tK)
        )
        coef_HK = trace_HC * (c * scale_C * scale_K)
        coef_KK = trace_CC * (c * damping)
        coef_HC = trace_HK * (c * scale_K * scale_C)
        coef_CC = trace_KK * (c * damping)
    # H_K, H_C, K^T K and C^T C are consumed here: m_K' and m_C' are made in place.
    new_m_K = H_K.mul_(coef_HK).add_(K_tK.mul_(coef_KK)).diag_add_(-c)
    new_m_C = H_C.mul_(coef_HC).add_(C_tC.mul_(coef_CC)).diag_add_(-c)
    if alpha1 != 0.0:
        new_m_K.add_(m_K, alpha=alpha1)
        new_m_C.add_(m_C, alpha=alpha1)
    beta1_K = beta1_C = lr_cov
    if normalize_lr_cov:
        beta1_K = lr_cov / new_m_K.infinity_vector_norm().to(torch.float64).clamp_min(1.0)
        beta1_C = lr_cov / new_m_C.infinity_vector_norm().to(torch.float64).clamp_min(1.0)
    # K^T K and C^T C were added into the new momenta: their storage is spent.
    K.add_product_(new_m_K, alpha=-beta1_K, spent=K_tK)
    C.add_product_(new_m_C, alpha=-beta1_C, spent=C_tC)
    return SINGDFactors(K, C, new_m_K, new_m_C)


def singd_natural_gradient(K: StructuredMatrix, C: StructuredMatrix, grad: Tensor) -> Tensor:
    """``C C^T G K K^T`` in the factors' dtypes, returned in the dtype of ``G``.

    Written as ``C C^T (K K^T G^T)^T``, each factor applied by its structure's
    `StructuredMatrix.outer_matmat_` in the gradient's memory where the structure can
    (diagonal, hierarchical): no temporary of the gradient's size instead of four,
    which matters on the CPU, where every large temporary costs fresh pages. Two diagonal
    factors scale columns by ``k^2`` and rows by ``c^2`` directly. ``grad`` may be
    overwritten (pass a copy to keep it).
    """
    if K.name == "diagonal" and C.name == "diagonal":
        k, c = K.tensors()["diag"], C.tensors()["diag"]
        nat = grad.to(k.dtype).mul_(k * k)
        return nat.to(c.dtype).mul_((c * c).unsqueeze(1)).to(grad.dtype)
    nat = K.outer_matmat_(grad.to(K.dtype).T).T
    both_dense = isinstance(K, DenseMatrix) and isinstance(C, DenseMatrix)
    if both_dense and grad.dtype == nat.dtype == C.dtype and grad.is_contiguous():
        # A dense K made nat a new tensor, so grad is spent: the last product goes into
        # its memory, still in cache (one thread, a 512 x 513 layer: 3% faster).
        return C.outer_matmat_(nat, out=grad)
    nat = C.outer_matmat_(nat.to(C.dtype))
    return nat.to(grad.dtype)


def singd_natural_gradient_from_rows(
    K: DenseMatrix, C: DenseMatrix, a: Tensor, g: Tensor, scale: Scale
) -> Tensor:
    """``scale (g C C^T)^T (a K K^T)`` for rows ``a`` (n x d_K) and ``g`` (n x d_C): with
    ``scale = sqrt(n)``, `singd_natural_gradient` of ``G = sqrt(n) g^T a`` in four thin
    products and one outer one (`singd.optim.lowrank` says when it pays and when ``.grad``
    is that product). ``K``'s side in ``K``'s dtype, then ``C``'s, as there; returned in
    ``C``'s dtype. ``scale`` is a number or a 0-d tensor (not read)."""
    k, c = K.tensors()["mat"], C.tensors()["mat"]
    right = (a.to(k.dtype) @ k) @ k.T  # n x d_K
    left = (g.to(c.dtype) @ c) @ c.T  # n x d_C
    right = right.to(c.dtype)
    if not_one(scale):
        right.mul_(scale)  # on the n x d_K rows rather than the d_C x d_K result
    return left.T @ right


def heavy_ball_(
    params: list[Tensor],
    directions: list[Tensor],
    state: dict[Tensor, dict],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """``p <- p - lr * buf`` with ``buf = momentum * buf + (direction + wd * p)``.

    ``directions`` are the caller's own tensors: weight decay is added into them in
    place. ``state`` (the optimizer's, a defaultdict) holds each parameter's
    ``momentum_buffer`` (made on first use as a copy of its first step; without
    momentum it is not touched). The foreach calls do per tensor exactly what ``add_`` and
    ``mul_`` do, in fewer dispatches.
    """
    steps = directions
    if weight_decay != 0.0:
        torch._foreach_add_(steps, params, alpha=weight_decay)
    if momentum != 0.0:
        states = [state[p] for p in params]
        old = [
            (entry["momentum_buffer"], d)
            for entry, d in zip(states, steps, strict=True)
            if "momentum_buffer" in entry
        ]
        if old:
            torch._foreach_mul_([b for b, _ in old], momentum)
            torch._foreach_add_([b for b, _ in old], [d for _, d in old])
        for entry, d in zip(states, steps, strict=True):
            if "momentum_buffer" not in entry:
                entry["momentum_buffer"] = d.clone(memory_format=torch.contiguous_format)
        steps = [entry["momentum_buffer"] for entry in states]
    torch._foreach_add_(params, steps, alpha=-lr)
