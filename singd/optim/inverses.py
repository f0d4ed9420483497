"""Inverting KFAC's damped Kronecker factors, and what happens when that fails.

Four methods invert a symmetric positive definite matrix ``M`` (a damped factor, stored in
the optimizer's ``factor_dtype``):

- ``cholesky``: ``M = L L^T`` (LAPACK ``potrf``), then ``M^-1`` from ``L`` (``potri``).
  Fails when ``M`` is not numerically positive definite.
- ``eigh``: ``M = V diag(w) V^T``, ``M^-1 = V diag(1/w) V^T``. Fails when the smallest
  eigenvalue is not positive.
- ``inv``: LU with partial pivoting (``getrf``/``getri``). Fails only when ``M`` is
  exactly singular: it does not check definiteness.
- ``newton-schulz``: the iteration ``X_{k+1} = X_k (2 I - M X_k)`` computed entirely in
  the factor dtype, i.e. a true low-precision inverse (no LAPACK call, so it also runs
  on float16/bfloat16 where ``torch.linalg`` has no kernels). See `newton_schulz`.

The three LAPACK methods compute in ``inverse_dtype`` (float32 or float64) and cast the
result to the factor's dtype. That cast is deliberately *not* a failure: a float16
inverse with an entry beyond 65504 is stored as inf, as any float16 implementation would
store it, and the probes see it. A *failure* is an inversion that produced nothing usable:
non-finite input, a matrix that is not positive definite (``cholesky``, ``eigh``) or is
singular (``inv``), a non-finite result in the compute dtype, or Newton-Schulz not
converging. `invert_or_keep` turns a failure into "keep the previous inverse" (the
identity if there is none, so the layer takes a plain gradient step), raises instead
when asked to, and saves the failing matrix as a reproducer.

Replaying a reproducer outside training (`singd.optim.replay`)::

    python -m singd.optim.replay FAILURE.pt

prints the matrix's size, dtype and method, re-runs the inversion on the stored matrix,
and exits 1 if it fails again (with the reason), 0 if it now succeeds.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import Tensor

INVERSE_METHODS = ("cholesky", "eigh", "inv", "newton-schulz")
INVERSE_DTYPES = (torch.float32, torch.float64)
ON_FAILURE = ("keep", "raise")

NEWTON_SCHULZ_MAX_ITER = 100
"""Enough from the safe start for condition numbers up to about 1e12 (see `newton_schulz`)."""
NEWTON_SCHULZ_ACCEPT = 0.5
"""Largest accepted spectral norm of the residual ``I - M X`` (see `newton_schulz`)."""
NEWTON_SCHULZ_PATIENCE = 2
"""Iterations without a smaller residual after which the rounding floor is taken as reached."""


class InversionError(RuntimeError):
    """An inversion that produced no usable inverse.

    Attributes:
        reason: One sentence saying what failed.
        method: The inverse method.
        matrix: The matrix that failed, as given (the damped factor, in its dtype).
        inverse_dtype: The dtype the inversion computed in.
    """

    def __init__(self, reason: str, matrix: Tensor, method: str, inverse_dtype: torch.dtype):
        what = f"{_shape(matrix)} {matrix.dtype}"
        super().__init__(f"{method} inversion of a {what} matrix: {reason}")
        self.reason = reason
        self.matrix = matrix
        self.method = method
        self.inverse_dtype = inverse_dtype


def _shape(matrix: Tensor) -> str:
    return "x".join(str(s) for s in matrix.shape)


def check_method(method: str) -> str:
    """Return ``method`` if it names an inverse method, else raise one clear ValueError."""
    if method not in INVERSE_METHODS:
        raise ValueError(
            f"inverse_method must be one of {', '.join(INVERSE_METHODS)}, got {method!r}."
        )
    return method


def check_inverse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return ``dtype`` if LAPACK can compute in it (float32, float64), else raise."""
    if dtype not in INVERSE_DTYPES:
        raise ValueError(
            f"inverse_dtype must be torch.float32 or torch.float64 (torch.linalg has no "
            f"float16/bfloat16 kernels), got {dtype}."
        )
    return dtype


def invert(
    matrix: Tensor,
    method: str,
    *,
    inverse_dtype: torch.dtype = torch.float32,
    initial: Tensor | None = None,
) -> Tensor:
    """Invert a symmetric positive definite matrix; the result has ``matrix``'s dtype.

    Args:
        matrix: ``d x d``, symmetric positive definite (the damped factor).
        method: One of `INVERSE_METHODS`.
        inverse_dtype: Compute dtype of the LAPACK methods (float32 or float64);
            ``newton-schulz`` ignores it and computes in ``matrix.dtype``.
        initial: For ``newton-schulz`` only: a previous inverse to warm-start from, used
            when it is close enough to guarantee convergence.

    Returns:
        ``matrix^-1`` in ``matrix.dtype``; entries beyond that dtype's range are +-inf.

    Raises:
        InversionError: Non-finite input, not positive definite / singular, non-finite
            result in the compute dtype, or no convergence.
    """
    check_method(method)
    check_inverse_dtype(inverse_dtype)
    if method == "newton-schulz":
        if not bool(torch.isfinite(matrix).all()):
            raise InversionError("the matrix has non-finite entries.", matrix, method, matrix.dtype)
        return newton_schulz(matrix, initial=initial)
    if not bool(torch.isfinite(matrix).all()):
        raise InversionError("the matrix has non-finite entries.", matrix, method, inverse_dtype)
    work = matrix.to(inverse_dtype)
    if method == "cholesky":
        factor, info = torch.linalg.cholesky_ex(work)
        if int(info) != 0:
            raise InversionError(
                f"not positive definite (leading minor {int(info)} is not positive).",
                matrix,
                method,
                inverse_dtype,
            )
        result = torch.cholesky_inverse(factor)
    elif method == "eigh":
        try:
            eigenvalues, eigenvectors = torch.linalg.eigh(work)
        except torch.linalg.LinAlgError as err:
            raise InversionError(
                f"the eigensolver did not converge ({err}).", matrix, method, inverse_dtype
            ) from err
        smallest = float(eigenvalues.min())
        if not smallest > 0:
            raise InversionError(
                f"not positive definite (smallest eigenvalue {smallest:.3e}).",
                matrix,
                method,
                inverse_dtype,
            )
        result = (eigenvectors / eigenvalues) @ eigenvectors.mT
    else:
        result, info = torch.linalg.inv_ex(work)
        if int(info) != 0:
            raise InversionError(
                f"singular (pivot {int(info)} is zero).", matrix, method, inverse_dtype
            )
    if not bool(torch.isfinite(result).all()):
        raise InversionError(
            f"the inverse is not finite in {inverse_dtype}.", matrix, method, inverse_dtype
        )
    return result.to(matrix.dtype)


def newton_schulz(matrix: Tensor, *, initial: Tensor | None = None) -> Tensor:
    """Newton-Schulz (Hotelling-Bodewig) inverse, every product in ``matrix.dtype``.

    With the residual ``R_k = I - M X_k`` the step ``X_{k+1} = X_k + X_k R_k`` squares it:
    ``R_{k+1} = R_k^2``, so it converges quadratically once ``||R_k|| < 1`` (Frobenius
    norm, an upper bound of the spectral radius).

    Start: ``X_0 = M^T / (||M||_1 ||M||_inf)``, the classical choice (Pan & Schreiber 1991)
    that guarantees convergence for any non-singular ``M``: the eigenvalues of ``M X_0`` lie
    in ``(0, 1]``, the smallest about ``1 / (kappa^2 d)``, which doubles each step until the
    quadratic phase, so about ``log2(kappa^2 d) + 5`` iterations are needed. The scalar
    ``||M||_1 ||M||_inf`` is computed in float32 (it alone may overflow float16); ``X_0`` is
    rounded once to the factor dtype. A warm start ``initial`` (the previous inverse) is
    used instead when its residual's spectral norm is below 1, which guarantees
    convergence too (and takes a few iterations when the factor changed little).

    Stopping: after at most `NEWTON_SCHULZ_MAX_ITER` iterations, as soon as ``||R||_F <=
    d eps`` (nothing left to gain in this dtype), or at the dtype's rounding floor: in exact
    arithmetic ``||R_{k+1}||_F <= ||R_k||_F^2``, so once ``||R_k||_F < 1`` a step that
    leaves more than twice that bound is dominated by rounding and the next would gain
    less than a factor 2; before that, when ``||R||_F`` has not improved for
    `NEWTON_SCHULZ_PATIENCE` iterations.

    Acceptance: the iterate with the smallest ``||R||_F`` is returned if the spectral norm
    of its residual ``||R||_2`` (estimated by power iteration in float32) is at most
    `NEWTON_SCHULZ_ACCEPT`: since ``X = M^-1 (I - R)``, ``||X - M^-1||_2 <= ||R||_2
    ||M^-1||_2``, so the inverse is then right to within half its norm in every direction
    (merely ``||R||_2 < 1`` would accept an ``X`` that all but ignores a direction). The
    Frobenius norm would reject usable float16/bfloat16 inverses of wide factors:
    rounding noise alone makes ``||R||_F`` about ``sqrt(d)`` times ``||R||_2``.

    Raises:
        InversionError: The best iterate's residual has ``||R||_2 > 1/2`` or is not finite
            (no convergence: the iterate is not an approximate inverse).
    """
    dim = matrix.shape[-1]
    eye = torch.eye(dim, dtype=matrix.dtype, device=matrix.device)
    tolerance = dim * torch.finfo(matrix.dtype).eps
    accumulate = torch.promote_types(matrix.dtype, torch.float32)

    def residual(x: Tensor) -> tuple[Tensor, float]:
        r = eye - matrix @ x
        # The norm is one number; summing d^2 squares in float16 would overflow.
        return r, float(torch.linalg.vector_norm(r.to(accumulate)))

    x = None
    if initial is not None and initial.shape == matrix.shape:
        x = initial.to(matrix.dtype)
        r, norm = residual(x)
        if not _spectral_norm(r.to(accumulate)) < 1:
            x = None
    if x is None:
        one_norm = float(matrix.abs().sum(dim=0, dtype=torch.float32).max())
        inf_norm = float(matrix.abs().sum(dim=1, dtype=torch.float32).max())
        x = (matrix.mT.to(torch.float32) / (one_norm * inf_norm)).to(matrix.dtype)
        r, norm = residual(x)
    best, best_r, best_norm, stale = x, r, norm, 0
    for _ in range(NEWTON_SCHULZ_MAX_ITER):
        if not math.isfinite(norm) or norm <= tolerance or stale >= NEWTON_SCHULZ_PATIENCE:
            break
        x = x + x @ r
        previous = norm
        r, norm = residual(x)
        if previous < 1 and norm > 2 * previous**2:
            if norm < best_norm:
                best, best_r, best_norm = x, r, norm
            break
        if norm < best_norm:
            best, best_r, best_norm, stale = x, r, norm, 0
        else:
            stale += 1
    spectral = _spectral_norm(best_r.to(accumulate)) if math.isfinite(best_norm) else math.inf
    if not spectral <= NEWTON_SCHULZ_ACCEPT:
        raise InversionError(
            f"Newton-Schulz did not converge (best residual ||I - M X||_2 = {spectral:.3e}, "
            f"above {NEWTON_SCHULZ_ACCEPT}, within {NEWTON_SCHULZ_MAX_ITER} iterations).",
            matrix,
            "newton-schulz",
            matrix.dtype,
        )
    return best


def _spectral_norm(r: Tensor, iterations: int = 20) -> float:
    """Largest singular value of ``r`` by power iteration on ``r^T r`` (a lower estimate)."""
    v = torch.ones(r.shape[-1], dtype=r.dtype, device=r.device)
    for _ in range(iterations):
        w = r.mT @ (r @ v)
        size = torch.linalg.vector_norm(w)
        if not size > 0:
            return float(size)
        v = w / size
    return float(torch.linalg.vector_norm(r @ v))


def save_reproducer(error: InversionError, directory: str | Path, tag: str) -> Path:
    """Save the matrix that failed, with what is needed to replay it, as a ``.pt`` file.

    The file holds only tensors, strings and numbers, so ``torch.load(path,
    weights_only=True)`` reads it: ``matrix`` (on the CPU, in its dtype), ``dtype``,
    ``method``, ``inverse_dtype``, ``device`` (where it failed), ``torch_version``,
    ``reason`` and ``tag``.

    Args:
        error: The failure.
        directory: Created if missing.
        tag: Names the file, e.g. ``"fc1.A.step12"``; unsafe characters become ``_``.

    Returns:
        The path written (never overwrites: a counter is appended if needed).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{tag}.{error.method}")
    path = directory / f"{stem}.pt"
    counter = 1
    while path.exists():
        path = directory / f"{stem}.{counter}.pt"
        counter += 1
    torch.save(
        {
            "matrix": error.matrix.detach().cpu().clone(),
            "dtype": str(error.matrix.dtype).removeprefix("torch."),
            "method": error.method,
            "inverse_dtype": str(error.inverse_dtype).removeprefix("torch."),
            "device": str(error.matrix.device),
            "torch_version": str(torch.__version__),
            "reason": error.reason,
            "tag": tag,
        },
        path,
    )
    return path


def invert_or_keep(
    matrix: Tensor,
    previous: Tensor | None,
    method: str,
    *,
    inverse_dtype: torch.dtype = torch.float32,
    on_failure: str = "keep",
    failure_dir: str | Path | None = None,
    tag: str = "factor",
) -> tuple[Tensor, InversionError | None]:
    """Invert ``matrix``; on failure keep ``previous`` (or the identity) instead.

    Args:
        matrix: The damped factor.
        previous: The inverse in use so far, or None.
        method, inverse_dtype: As `invert`; ``previous`` also warm-starts Newton-Schulz.
        on_failure: ``"keep"`` or ``"raise"`` (re-raise the `InversionError`, after
            saving the reproducer).
        failure_dir: If given, each failing matrix is saved there (`save_reproducer`).
        tag: Names the reproducer file.

    Returns:
        ``(inverse, error)``: the error is None on success.
    """
    try:
        return invert(matrix, method, inverse_dtype=inverse_dtype, initial=previous), None
    except InversionError as error:
        if failure_dir is not None:
            save_reproducer(error, failure_dir, tag)
        if on_failure == "raise":
            raise
        if previous is None:
            previous = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
        return previous, error


DEVICE_METHODS = ("cholesky", "eigh", "inv")
"""Methods `invert_or_keep_on_device` runs without reading a result on the host."""


def invert_or_keep_on_device(
    matrix: Tensor,
    previous: Tensor | None,
    method: str,
    *,
    inverse_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """`invert_or_keep` for ``on_failure="keep"`` without reproducers, decided on the device.

    The same verdicts as `invert` (non-finite input, not positive definite or singular,
    non-finite result in the compute dtype), computed as a 0-d tensor that nothing
    reads: the inverse, or ``previous`` (the identity if None) where the inversion
    failed, is chosen with ``torch.where``. So a training step never waits for the
    device to learn whether an inversion worked; the failure counts are read when asked.
    LAPACK never sees a non-finite matrix (the identity stands in for it). Newton-Schulz
    is not offered: its iteration count depends on its residuals.

    Returns:
        ``(inverse, failed)``: ``failed`` a 0-d bool tensor on the matrix's device.
    """
    if method not in DEVICE_METHODS:
        raise ValueError(f"{method!r} cannot be decided on the device; use invert_or_keep.")
    check_inverse_dtype(inverse_dtype)
    dim = matrix.shape[-1]
    eye = torch.eye(dim, dtype=inverse_dtype, device=matrix.device)
    finite = torch.isfinite(matrix).all()
    work = torch.where(finite, matrix.to(inverse_dtype), eye)
    if method == "cholesky":
        factor, info = torch.linalg.cholesky_ex(work)
        ok = info == 0
        result = torch.cholesky_inverse(torch.where(ok, factor, eye))
    elif method == "eigh":
        eigenvalues, eigenvectors = torch.linalg.eigh(work)
        ok = eigenvalues.min() > 0
        result = (eigenvectors / eigenvalues) @ eigenvectors.mT
    else:
        result, info = torch.linalg.inv_ex(work)
        ok = info == 0
    ok = ok & finite & torch.isfinite(result).all()
    if previous is None:
        previous = torch.eye(dim, dtype=matrix.dtype, device=matrix.device)
    return torch.where(ok, result.to(matrix.dtype), previous), ~ok


def replay(path: str | Path) -> tuple[dict, InversionError | None]:
    """Re-run a saved reproducer's inversion on its stored matrix.

    Runs on the recorded device when it exists here, else on the CPU.

    Returns:
        ``(record, error)``: the loaded record and the failure, or None if it now succeeds.
    """
    record = torch.load(path, weights_only=True)
    device = record["device"]
    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    matrix = record["matrix"].to(device)
    # Newton-Schulz records its compute dtype, the matrix's; invert() ignores it there.
    inverse_dtype = getattr(torch, record["inverse_dtype"])
    if inverse_dtype not in INVERSE_DTYPES:
        inverse_dtype = torch.float32
    try:
        invert(matrix, record["method"], inverse_dtype=inverse_dtype)
    except InversionError as error:
        return record, error
    return record, None
