"""Thin aliases: the published singd 0.0.5 module ``singd.optim.utils``.

The published helpers that turn a layer's input and output gradient into the rows of
the Kronecker factors, with the published signatures (a module instead of our
:class:`~singd.optim.layers.KroneckerLayer`), computed by
:mod:`singd.optim.layers`: the same rows SINGD itself uses.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from singd.optim.layers import KroneckerLayer, _conv_patches, is_supported, layer_dims
from singd.optim.layers import process_grad_output as _process_grad_output
from singd.optim.layers import process_input as _process_input


def _as_layer(module: nn.Module) -> KroneckerLayer:
    """The module as a layer whose bias, if it has one, the factor ``K`` covers."""
    if not is_supported(module):
        raise NotImplementedError(f"Only supported layers have factors, got {module}.")
    has_bias = module.bias is not None
    dim_K, dim_C = layer_dims(module, has_bias)
    return KroneckerLayer("", module, 0, has_bias, dim_K, dim_C)


def process_input(x: Tensor, module: nn.Module, kfac_approx: str) -> Tensor:
    """Rows ``a`` of the input factor (unfolded for Conv2d, a ones column appended when
    the layer has a bias, scaled by ``1/sqrt(rows)``).

    Args:
        x: The layer's input.
        module: The ``nn.Linear`` or ``nn.Conv2d``.
        kfac_approx: ``"expand"`` or ``"reduce"``.

    Returns:
        ``a``, shape ``(rows, d_K)``.
    """
    return _process_input(x, _as_layer(module), kfac_approx)


def process_grad_output(
    grad_output: Tensor, module: nn.Module, loss_average: str | None, kfac_approx: str
) -> Tensor:
    """Rows ``g`` of the output-gradient factor, times ``sqrt(number of loss terms)``.

    Args:
        grad_output: Gradient of the loss w.r.t. the layer's output.
        module: The ``nn.Linear`` or ``nn.Conv2d``.
        loss_average: ``None``, ``"batch"`` or ``"batch+sequence"``.
        kfac_approx: ``"expand"`` or ``"reduce"``.

    Returns:
        ``g``, shape ``(rows, d_C)``.
    """
    return _process_grad_output(grad_output, _as_layer(module), loss_average, kfac_approx)


def _extract_patches(
    x: Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: int | tuple[int, int] | str,
    dilation: int | tuple[int, int],
    groups: int,
) -> Tensor:
    """A Conv2d input's patches, averaged over channel groups: ``(B, L, C_in/groups *
    k1 * k2)`` for L output locations (the published private helper's signature)."""
    conv = nn.Conv2d(
        x.shape[1],
        groups,
        _pair(kernel_size),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=False,
        device="meta",  # only its settings are read: no weight is allocated
    )
    return _conv_patches(x, conv)


def _extract_averaged_patches(
    x: Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: int | tuple[int, int] | str,
    dilation: int | tuple[int, int],
    groups: int,
) -> Tensor:
    """:func:`_extract_patches` averaged over output locations: ``(B, C_in/groups * k1 *
    k2)``, the rows of ``kfac_approx="reduce"``."""
    return _extract_patches(x, kernel_size, stride, padding, dilation, groups).mean(1)
