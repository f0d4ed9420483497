"""What a Kronecker-factored optimizer needs to know about a layer.

A supported layer (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, and transposed linear
layers such as GPT-2's ``Conv1D``) with weight ``W`` and optional bias ``b`` is treated
as one matrix ``[W | b]`` of shape ``d_C x d_K`` (conv weights flattened to
``C_out x (C_in/groups * k1 [* k2])``, a transposed linear weight transposed), so that
its Fisher block is approximated by a Kronecker product ``E[a a^T] (x) E[g g^T]`` of an
input factor (``d_K x d_K``) and an output-gradient factor (``d_C x d_C``):

- Linear: ``d_K = d_in (+1 with bias)``, ``d_C = d_out``.
- Transposed linear (weight ``(d_in, d_out)``, forward ``x @ W + b``): as Linear.
- Conv1d: ``d_K = C_in/groups * k (+1)``, ``d_C = C_out``.
- Conv2d: ``d_K = C_in/groups * k1 * k2 (+1)``, ``d_C = C_out``.

Transposed linear layers are recognised by duck typing, so that models from libraries
this package does not import are covered: HuggingFace transformers' GPT-2 ``Conv1D`` is
any module whose class is named ``Conv1D`` with an ``nf`` attribute and a 2-D weight of
shape ``(nx, nf)`` (`looks_like_gpt2_conv1d`). Other such layers can be added with
`register_transposed_linear` (a class or a predicate on modules).

This module turns a layer's input into the rows ``a`` (``n x d_K``) and its output
gradient into the rows ``g`` (``n x d_C``) whose Gram matrices ``a^T a`` and ``g^T g``
are those factors, scaled as the published SINGD does (Lin et al., 2024, and
Eschenhagen et al., 2023, for ``expand``/``reduce``):

- ``a`` is divided by ``sqrt(n)``, so ``a^T a`` is the mean outer product over rows.
- ``g`` is multiplied by ``sqrt(number of loss terms)``: the batch size B for
  ``loss_average="batch"``, B times the shared (sequence or spatial) size for
  ``"batch+sequence"``, 1 for ``None`` (a summed loss). This undoes the ``1/B`` that
  a mean loss puts into every output gradient, once per factor.
- ``expand`` treats every shared position (sequence element, output pixel) as a row;
  ``reduce`` averages the inputs and sums the output gradients over shared positions,
  leaving one row per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from math import sqrt

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
"""The supported layer classes; transposed linear layers (`is_transposed_linear`) are
recognised by duck typing besides: test with `is_supported`."""
CONV_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)
LOSS_AVERAGES: tuple[str | None, ...] = (None, "batch", "batch+sequence")
KFAC_APPROXES: tuple[str, ...] = ("expand", "reduce")


def looks_like_gpt2_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is HuggingFace transformers' GPT-2 ``Conv1D``, without importing
    transformers: a class named ``Conv1D`` with an integer ``nf`` and a 2-D weight of
    shape ``(nx, nf)`` (bias, if any, of shape ``(nf,)``)."""
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    bias = getattr(module, "bias", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and isinstance(nf, int)
        and weight.shape[1] == nf
        and (bias is None or (isinstance(bias, Tensor) and tuple(bias.shape) == (nf,)))
    )


TRANSPOSED_LINEAR_CHECKS: list[Callable[[nn.Module], bool]] = [looks_like_gpt2_conv1d]
"""Predicates recognising transposed linear layers: a module holding ``weight`` of shape
``(d_in, d_out)`` and optional ``bias`` of shape ``(d_out,)``, whose forward maps the
last dimension of its first input by ``x @ weight + bias``. Extend it with
`register_transposed_linear`."""


def register_transposed_linear(layer: type[nn.Module] | Callable[[nn.Module], bool]) -> None:
    """Precondition another transposed linear layer type (see `TRANSPOSED_LINEAR_CHECKS`).

    Register before building the optimizer; it finds its layers when it is built.

    Args:
        layer: The layer class (its instances, subclasses' included, are recognised), or
            a predicate returning True for the modules to treat as transposed linear.

    Raises:
        TypeError: ``layer`` is neither a class nor callable.
    """
    if isinstance(layer, type):
        cls = layer

        def check(module: nn.Module) -> bool:
            return isinstance(module, cls)

        check.__name__ = f"is_{cls.__name__}"
        TRANSPOSED_LINEAR_CHECKS.append(check)
    elif callable(layer):
        TRANSPOSED_LINEAR_CHECKS.append(layer)
    else:
        raise TypeError(f"Expected a module class or a predicate, got {layer!r}.")


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether a registered check (`TRANSPOSED_LINEAR_CHECKS`) recognises ``module``."""
    return not isinstance(module, SUPPORTED_LAYERS) and any(
        check(module) for check in TRANSPOSED_LINEAR_CHECKS
    )


def is_supported(module: nn.Module) -> bool:
    """Whether a Kronecker factor pair can precondition ``module``'s parameters."""
    return isinstance(module, SUPPORTED_LAYERS) or is_transposed_linear(module)


@dataclass(eq=False)
class KroneckerLayer:
    """A supported layer whose parameters one Kronecker-factored preconditioner covers.

    Attributes:
        name: Qualified name in the (unwrapped) model.
        module: The supported layer (`is_supported`).
        group_index: Index of the parameter group holding its parameters.
        has_bias: Whether the bias is optimized (and so covered by ``K``): a frozen or
            absent bias adds no ones column.
        dim_K: Input-side dimension (columns of the gradient matrix).
        dim_C: Output-side dimension (rows of the gradient matrix).
        passes: Backward calls of the layer whose curvature was accumulated since the
            last preconditioner update: one per backward pass, more when the layer runs
            more than once per forward (its calls are then rows of one batch, as
            ``kfac_approx="expand"`` treats shared dimensions).
        backward_passes: Distinct backward passes (``loss.backward()`` calls) among
            those calls: gradient accumulation, which rescales the output side.
        graph_task: The autograd graph task of the last call (``-1``: none yet).
        fired: Whether the layer's forward hook has ever run (layers that never run
            their own forward, such as ``nn.MultiheadAttention.out_proj``, are moved to
            the fallback optimizer).
        skipped_steps: Steps skipped because a GradScaler found infs.
        param_names: Qualified names of `params`.
        transposed: Whether the module is a transposed linear layer (weight
            ``(d_in, d_out)``), set from the module.
    """

    name: str
    module: nn.Module
    group_index: int
    has_bias: bool
    dim_K: int  # noqa: N815 (the paper's symbol)
    dim_C: int  # noqa: N815
    passes: int = 0
    backward_passes: int = 0
    graph_task: int = -1
    fired: bool = False
    skipped_steps: int = 0
    param_names: tuple[str, ...] = field(default=())
    transposed: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.transposed = is_transposed_linear(self.module)

    @property
    def params(self) -> list[Tensor]:
        """The optimized parameters, weight first."""
        return [self.module.weight, self.module.bias] if self.has_bias else [self.module.weight]


def layer_dims(module: nn.Module, has_bias: bool) -> tuple[int, int]:
    """``(dim_K, dim_C)`` of a supported layer, as in the module docstring."""
    weight = module.weight
    if is_transposed_linear(module):
        return weight.shape[0] + int(has_bias), weight.shape[1]
    return weight.shape[1:].numel() + int(has_bias), weight.shape[0]


def check_conv_padding(module: nn.Module) -> None:
    """Raise ValueError where a layer's padding cannot be unfolded into patches."""
    if isinstance(module, CONV_LAYERS) and module.padding_mode not in (
        "zeros",
        "reflect",
        "replicate",
        "circular",
    ):
        raise ValueError(
            f"{type(module).__name__} padding_mode {module.padding_mode!r} is not supported."
        )


def _conv_patches(x: Tensor, conv: nn.Conv1d | nn.Conv2d) -> Tensor:
    """Unfold a conv input into patches, shape ``(B, L, C_in/groups * k1 [* k2])``.

    Channel groups share one input factor, so the patches are averaged over groups, as
    the published SINGD does; ``L`` is the number of output locations. A Conv1d input
    ``(B, C, I)`` is unfolded as the height-1 image ``(B, C, 1, I)`` under the kernel
    ``(1, k)``.
    """
    if conv.groups > 1:
        batch, channels = x.shape[:2]
        x = x.reshape(batch, conv.groups, channels // conv.groups, *x.shape[2:]).mean(1)
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        # 'same' may pad unequally and non-zero modes pad with data: pad explicitly the
        # way the convolution itself does, then unfold without padding.
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(conv.kernel_size)
    kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
    if isinstance(conv, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
        padding = (0, *padding)
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2)


def input_rows(x: Tensor, layer: KroneckerLayer, kfac_approx: str) -> Tensor:
    """The rows of the input factor before scaling and without the bias's ones column
    (``n x d_in``; a view of ``x`` where the layout allows).

    Args:
        x: The layer's input: ``(B, ..., d_in)`` for (transposed) linear layers,
            ``(B, C_in, I)`` for Conv1d, ``(B, C_in, I1, I2)`` for Conv2d.
        layer: The layer.
        kfac_approx: ``"expand"`` (shared positions become rows) or ``"reduce"``
            (inputs averaged over shared positions).
    """
    module = layer.module
    if isinstance(module, CONV_LAYERS):
        patches = _conv_patches(x, module)
        return patches.flatten(0, 1) if kfac_approx == "expand" else patches.mean(1)
    if x.dim() == 2:
        return x
    if kfac_approx == "expand":
        return x.reshape(-1, x.shape[-1])
    return x.flatten(1, -2).mean(1)


def process_input(x: Tensor, layer: KroneckerLayer, kfac_approx: str) -> Tensor:
    """Rows ``a`` (``n x d_K``) of the input factor, scaled by ``1/sqrt(n)``.

    Args:
        x, layer, kfac_approx: As `input_rows`.

    Returns:
        ``a`` with a ones column appended when the bias is optimized.
    """
    a = input_rows(x, layer, kfac_approx)
    if layer.has_bias:
        # A fresh tensor: scale it in place (large temporaries cost page faults on CPU).
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        return a.div_(sqrt(a.shape[0]))
    return a / sqrt(a.shape[0])


def output_rows(g: Tensor, layer: KroneckerLayer, kfac_approx: str) -> Tensor:
    """Rows (``n x d_C``) of the output gradient ``g`` (shaped like the layer's output),
    before the loss scaling of `process_grad_output`; ``reduce`` sums them over shared
    positions."""
    if isinstance(layer.module, CONV_LAYERS):
        rows = g.flatten(2).transpose(1, 2) if kfac_approx == "expand" else g.flatten(2).sum(2)
        return rows.reshape(-1, g.shape[1])
    if g.dim() == 2:
        return g
    rows = g if kfac_approx == "expand" else g.flatten(1, -2).sum(1)
    return rows.reshape(-1, g.shape[-1])


def loss_terms(g: Tensor, layer: KroneckerLayer, loss_average: str | None) -> int:
    """The number of loss terms a mean loss averages over (module docstring): the batch
    size for ``"batch"``, times the shared size for ``"batch+sequence"``; 1 for ``None``."""
    if loss_average is None:
        return 1
    if loss_average == "batch":
        return g.shape[0]
    conv = isinstance(layer.module, CONV_LAYERS)
    return g.shape[0] * (g.shape[2:] if conv else g.shape[1:-1]).numel()


def process_grad_output(
    g: Tensor, layer: KroneckerLayer, loss_average: str | None, kfac_approx: str
) -> Tensor:
    """Rows ``g`` (``n x d_C``) of the output-gradient factor, with the loss scaling.

    Args:
        g: Gradient of the loss w.r.t. the layer's output, shaped like the output.
        layer: The layer.
        loss_average: ``None``, ``"batch"`` or ``"batch+sequence"`` (module docstring).
        kfac_approx: ``"expand"`` or ``"reduce"`` (output gradients summed over shared
            positions).

    Returns:
        ``g`` reshaped to rows (`output_rows`) and multiplied by ``sqrt(number of loss
        terms)`` (`loss_terms`).
    """
    rows = output_rows(g, layer, kfac_approx)
    if loss_average is None:
        return rows
    return rows * sqrt(loss_terms(g, layer, loss_average))


def gradient_matrix(layer: KroneckerLayer) -> Tensor:
    """The layer's gradient as the ``d_C x d_K`` matrix ``[dW | db]``.

    Always a new contiguous tensor (never a view of ``.grad``), so callers may work in it
    in place. A transposed linear layer's weight gradient ``(d_in, d_out)`` is
    transposed.
    """
    grad = layer.module.weight.grad
    grad = grad.t() if layer.transposed else grad.flatten(1)
    if layer.has_bias:
        return torch.cat([grad, layer.module.bias.grad.unsqueeze(1)], dim=1)
    return grad.clone(memory_format=torch.contiguous_format)


def split_matrix(layer: KroneckerLayer, mat: Tensor) -> list[Tensor]:
    """Inverse of `gradient_matrix`: ``[dW | db]`` back to tensors shaped like the params."""
    weight = layer.module.weight
    dW = mat[:, :-1] if layer.has_bias else mat
    dW = dW.t().contiguous() if layer.transposed else dW.reshape(weight.shape)
    return [dW, mat[:, -1]] if layer.has_bias else [dW]
