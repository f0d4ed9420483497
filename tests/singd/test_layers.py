"""The rows ``a`` and ``g`` of the Kronecker factors, against plain constructions.

Conv patches are checked against a patch extractor written with explicit index loops
(the textbook definition of a strided, padded, dilated, grouped convolution); the link
between ``a`` and ``g`` is checked through the weight gradient, which for ``expand``
without groups is exactly ``sum over rows of g a^T``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from singd import SINGD
from singd.optim.layers import (
    KroneckerLayer,
    gradient_matrix,
    layer_dims,
    process_grad_output,
    process_input,
    split_matrix,
)

CONVS = {
    "plain": dict(in_channels=3, out_channels=4, kernel_size=3),
    "stride_padding": dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1),
    "dilation": dict(in_channels=2, out_channels=3, kernel_size=(2, 3), dilation=(2, 1), padding=2),
    "groups": dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1),
    "same_even_kernel": dict(in_channels=2, out_channels=3, kernel_size=(2, 4), padding="same"),
    "reflect": dict(
        in_channels=2, out_channels=3, kernel_size=3, padding=1, padding_mode="reflect"
    ),
    "no_bias": dict(in_channels=3, out_channels=2, kernel_size=2, stride=(1, 2), bias=False),
}


def wrap(module: nn.Module) -> KroneckerLayer:
    has_bias = module.bias is not None
    dim_K, dim_C = layer_dims(module, has_bias)
    return KroneckerLayer("layer", module, 0, has_bias, dim_K, dim_C)


def plain_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Patches ``(B, O1 * O2, C_in/groups * k1 * k2)`` by explicit loops, group-averaged."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        # Pad exactly as the convolution does, then the loops below see no padding.
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = (0, 0)
    else:
        padding = conv.padding
    batch, channels, height, width = x.shape
    per_group = channels // conv.groups
    x = x.reshape(batch, conv.groups, per_group, height, width).mean(1)
    (k1, k2), (s1, s2), (d1, d2), (p1, p2) = conv.kernel_size, conv.stride, conv.dilation, padding
    out1 = (height + 2 * p1 - d1 * (k1 - 1) - 1) // s1 + 1
    out2 = (width + 2 * p2 - d2 * (k2 - 1) - 1) // s2 + 1
    patches = torch.zeros(batch, out1 * out2, per_group, k1, k2, dtype=x.dtype)
    for o1 in range(out1):
        for o2 in range(out2):
            for i in range(k1):
                for j in range(k2):
                    r, c = o1 * s1 - p1 + i * d1, o2 * s2 - p2 + j * d2
                    if 0 <= r < height and 0 <= c < width:
                        patches[:, o1 * out2 + o2, :, i, j] = x[:, :, r, c]
    return patches.flatten(2)


@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_conv_input_rows_match_explicit_patches(name, kfac_approx):
    conv = nn.Conv2d(**CONVS[name]).double()
    x = torch.randn(3, conv.in_channels, 7, 8, dtype=torch.float64)
    layer = wrap(conv)
    patches = plain_patches(x, conv)
    rows = patches.flatten(0, 1) if kfac_approx == "expand" else patches.mean(1)
    if conv.bias is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
    expected = rows / math.sqrt(rows.shape[0])
    a = process_input(x, layer, kfac_approx)
    assert a.shape == (rows.shape[0], layer.dim_K)
    torch.testing.assert_close(a, expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", ["plain", "stride_padding", "dilation", "same_even_kernel"])
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv_rows_reproduce_the_weight_gradient(name):
    """For groups = 1 and expand, ``[dW | db] = sum_rows g_row a_row^T`` exactly."""
    conv = nn.Conv2d(**CONVS[name]).double()
    x = torch.randn(3, conv.in_channels, 7, 8, dtype=torch.float64)
    out = conv(x)
    out.retain_grad()
    (out**2).sum().backward()
    layer = wrap(conv)
    a = process_input(x, layer, "expand") * math.sqrt(3 * out.shape[2] * out.shape[3])
    g = process_grad_output(out.grad, layer, None, "expand")
    torch.testing.assert_close(g.T @ a, gradient_matrix(layer), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_average", [None, "batch", "batch+sequence"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_sequence_rows(loss_average, kfac_approx):
    linear = nn.Linear(5, 4).double()
    layer = wrap(linear)
    x = torch.randn(3, 6, 2, 5, dtype=torch.float64)  # two shared dimensions: 6 x 2
    grad = torch.randn(3, 6, 2, 4, dtype=torch.float64)
    terms = {None: 1, "batch": 3, "batch+sequence": 36}[loss_average]
    if kfac_approx == "expand":
        inputs, outputs = x.reshape(36, 5), grad.reshape(36, 4)
    else:
        inputs, outputs = x.mean((1, 2)), grad.sum((1, 2))
    inputs = torch.cat([inputs, torch.ones(inputs.shape[0], 1, dtype=x.dtype)], 1)
    a = process_input(x, layer, kfac_approx)
    g = process_grad_output(grad, layer, loss_average, kfac_approx)
    torch.testing.assert_close(a, inputs / math.sqrt(inputs.shape[0]))
    torch.testing.assert_close(g, outputs * math.sqrt(terms))


def test_gradient_matrix_round_trip():
    for module in (nn.Linear(4, 3), nn.Conv2d(4, 6, 3, groups=2), nn.Linear(4, 3, bias=False)):
        for p in module.parameters():
            p.grad = torch.randn_like(p)
        layer = wrap(module)
        mat = gradient_matrix(layer)
        assert mat.shape == (layer.dim_C, layer.dim_K)
        for piece, p in zip(split_matrix(layer, mat), module.parameters(), strict=True):
            assert torch.equal(piece, p.grad)


def curvature_after_one_backward(model: nn.Module, X: torch.Tensor, **kwargs):
    optimizer = SINGD(model, T=1, **kwargs)
    model(X).square().sum().backward()
    return {name: dict(state) for name, state in optimizer._factors.items()}


def test_in_place_activation_sees_the_pre_activation_gradient():
    """The hook on the layer output's gradient survives ReLU(inplace=True)."""
    X = torch.randn(16, 5, dtype=torch.float64)
    results = []
    for inplace in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 2)).double()
        results.append(curvature_after_one_backward(model, X))
    for name in results[0]:
        for key in ("H_K", "H_C"):
            plain, inplace = (r[name][key].to_dense() for r in results)
            assert plain.abs().sum() > 0
            torch.testing.assert_close(inplace, plain, rtol=0, atol=0)


def test_curvature_terms_are_the_gram_matrices_at_identity():
    """At step 0 (K = C = I): H_K = a^T a and H_C = g^T g, built from plain autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh()).double()
    X = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    conv = model[0]
    out = conv(X)  # before the optimizer hooks the layer
    out.retain_grad()
    torch.tanh(out).square().sum().backward()
    patches = plain_patches(X, conv).flatten(0, 1)
    a = torch.cat([patches, torch.ones(len(patches), 1, dtype=X.dtype)], 1) / math.sqrt(
        len(patches)
    )
    g = out.grad.permute(0, 2, 3, 1).reshape(-1, 3) * math.sqrt(4)
    terms = curvature_after_one_backward(model, X, kfac_approx="expand")["0"]
    torch.testing.assert_close(terms["H_K"].to_dense(), a.T @ a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["H_C"].to_dense(), g.T @ g, rtol=1e-12, atol=1e-12)
