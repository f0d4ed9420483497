"""Layer types beyond Linear and Conv2d: nn.Conv1d and transposed linear layers (GPT-2's
``Conv1D``), and the coverage report.

Each new layer type is checked against the same computation built from layers already
supported, trained in float64 by SINGD (dense, diagonal) and KFAC: a Conv1d with kernel
``k`` on length ``L`` is a Conv2d with kernel ``(1, k)`` on height 1 (the same unfolded
patches, so the same steps bit for bit); a transposed linear layer with weight ``W`` is
an nn.Linear with weight ``W^T`` (the same steps up to float64 round-off: the products
are the same, their summation order may not be).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD
from singd.optim import layers as layers_module
from singd.optim.layers import (
    is_supported,
    looks_like_gpt2_conv1d,
    register_transposed_linear,
)
from tests.optimizers import factory

OPTIMIZERS = {
    "singd:dense": dict(lr=0.05, lr_cov=0.05, damping=1e-3, momentum=0.5, T=1),
    "singd:diagonal": dict(lr=0.05, lr_cov=0.05, damping=1e-3, momentum=0.5, T=1),
    "kfac": dict(lr=0.05, damping=1e-2, momentum=0.5, T=1, weight_decay=1e-3),
}
STEPS = 4


class Conv1D(nn.Module):
    """A transposed linear layer in GPT-2's convention, written for these tests: weight
    ``(nx, nf)``, bias ``(nf,)``, forward ``x @ weight + bias`` over the last dimension."""

    def __init__(self, nf: int, nx: int, bias: bool = True) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf) / 10) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight
        return out if self.bias is None else out + self.bias


def train(model, optimizer, batches, loss_fn) -> None:
    for X, y in batches:
        optimizer.zero_grad()
        loss_fn(model(X), y).backward()
        optimizer.step()


def batches(shape, targets, steps=STEPS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(*shape, generator=gen, dtype=torch.float64),
            torch.randn(*targets, generator=gen, dtype=torch.float64),
        )
        for _ in range(steps)
    ]


def mse(out, y):
    return ((out - y) ** 2).mean()


# ------------------------------------------------------------------------ Conv1d
CONV1D = {
    "plain": dict(kernel_size=3),
    "stride_padding_dilation": dict(kernel_size=3, stride=2, padding=2, dilation=2),
    "groups_no_bias": dict(kernel_size=2, groups=2, bias=False),
    "same": dict(kernel_size=5, dilation=2, padding="same"),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "circular": dict(kernel_size=3, padding=2, padding_mode="circular"),
}
C_IN, C_OUT, LENGTH, BATCH = 4, 6, 11, 5


def as_conv2d(conv: nn.Conv1d) -> nn.Conv2d:
    """The Conv2d computing ``conv`` on inputs ``(B, C, 1, L)``, with its weights."""
    padding = conv.padding if isinstance(conv.padding, str) else (0, conv.padding[0])
    conv2d = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        (1, conv.kernel_size[0]),
        stride=(1, conv.stride[0]),
        padding=padding,
        dilation=(1, conv.dilation[0]),
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    ).double()
    with torch.no_grad():
        conv2d.weight.copy_(conv.weight.unsqueeze(2))
        if conv.bias is not None:
            conv2d.bias.copy_(conv.bias)
    return conv2d


class Conv1dNet(nn.Module):
    def __init__(self, conv: nn.Module, out_len: int, two_d: bool) -> None:
        super().__init__()
        self.conv, self.two_d = conv, two_d
        self.head = nn.Linear(C_OUT * out_len, 3).double()

    def forward(self, x):
        h = self.conv(x.unsqueeze(2) if self.two_d else x)
        return self.head(torch.tanh(h).flatten(1))


def conv_pair(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv1d(C_IN, C_OUT, **kwargs).double()
    out_len = conv(torch.zeros(1, C_IN, LENGTH, dtype=torch.float64)).shape[-1]
    one = Conv1dNet(conv, out_len, two_d=False)
    two = Conv1dNet(as_conv2d(conv), out_len, two_d=True)
    two.head.load_state_dict(one.head.state_dict())
    return one, two


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", sorted(CONV1D))
@pytest.mark.parametrize("spec", sorted(OPTIMIZERS))
def test_conv1d_trains_as_conv2d_on_height_one(spec, name, kfac_approx):
    one, two = conv_pair(CONV1D[name])
    hp = dict(OPTIMIZERS[spec], kfac_approx=kfac_approx, loss_average="batch")
    opt_one, opt_two = factory(spec, **hp)(one), factory(spec, **hp)(two)
    assert [layer.dim_K for layer in opt_one._layers] == [layer.dim_K for layer in opt_two._layers]
    data = batches((BATCH, C_IN, LENGTH), (BATCH, 3))
    train(one, opt_one, data, mse)
    train(two, opt_two, data, mse)
    assert torch.equal(one.conv.weight, two.conv.weight.squeeze(2))
    if one.conv.bias is not None:
        assert torch.equal(one.conv.bias, two.conv.bias)
    assert torch.equal(one.head.weight, two.head.weight)
    assert not torch.equal(one.conv.weight, conv_pair(CONV1D[name])[0].conv.weight)


def test_conv1d_dims():
    conv = nn.Conv1d(6, 4, 3, groups=2)
    layer = SINGD(nn.Sequential(conv))._layers[0]
    assert (layer.dim_K, layer.dim_C) == (6 // 2 * 3 + 1, 4)


def test_conv1d_unsupported_padding_mode_is_refused():
    conv = nn.Conv1d(2, 2, 3, padding=1)
    conv.padding_mode = "mirror"
    with pytest.raises(ValueError, match="Conv1d padding_mode 'mirror'"):
        SINGD(nn.Sequential(conv))


# ----------------------------------------------------------- transposed linear
D_IN, D_OUT, SEQ = 5, 4, 3


class TransposedNet(nn.Module):
    """Two layers over sequences ``(B, S, D_IN)``: transposed linear or nn.Linear."""

    def __init__(self, transposed: bool, bias: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        first, second = Conv1D(D_OUT, D_IN, bias), Conv1D(2, D_OUT, bias)
        if transposed:
            self.first, self.second = first, second
        else:
            self.first = nn.Linear(D_IN, D_OUT, bias=bias)
            self.second = nn.Linear(D_OUT, 2, bias=bias)
            for linear, conv in ((self.first, first), (self.second, second)):
                with torch.no_grad():
                    linear.weight.copy_(conv.weight.T)
                    if bias:
                        linear.bias.copy_(conv.bias)
        self.double()

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def weights(model: TransposedNet) -> list[torch.Tensor]:
    """Parameters in nn.Linear's layout."""
    out = []
    for layer in (model.first, model.second):
        out.append(layer.weight.T if isinstance(layer, Conv1D) else layer.weight)
        if layer.bias is not None:
            out.append(layer.bias)
    return out


def assert_round_off(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("kfac_approx", "loss_average"),
    [("expand", "batch"), ("expand", "batch+sequence"), ("reduce", "batch"), ("expand", None)],
)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("spec", sorted(OPTIMIZERS))
def test_transposed_linear_trains_as_linear(spec, bias, kfac_approx, loss_average):
    conv, linear = TransposedNet(True, bias), TransposedNet(False, bias)
    start = [w.clone() for w in weights(conv)]
    hp = dict(OPTIMIZERS[spec], kfac_approx=kfac_approx, loss_average=loss_average)
    opt_conv, opt_linear = factory(spec, **hp)(conv), factory(spec, **hp)(linear)
    assert [layer.transposed for layer in opt_conv._layers] == [True, True]
    assert [(layer.dim_K, layer.dim_C) for layer in opt_conv._layers] == [
        (layer.dim_K, layer.dim_C) for layer in opt_linear._layers
    ]
    data = batches((BATCH, SEQ, D_IN), (BATCH, SEQ, 2))
    train(conv, opt_conv, data, mse)
    train(linear, opt_linear, data, mse)
    assert_round_off(weights(conv), weights(linear))
    assert all(p.is_contiguous() for p in conv.parameters())
    assert not torch.equal(start[0], weights(conv)[0])


@pytest.mark.parametrize("spec", sorted(OPTIMIZERS))
@pytest.mark.parametrize("transposed", [True, False])
def test_checkpoint_round_trip(spec, transposed):
    """Resuming from a state_dict continues exactly as training on would."""

    def build():
        if transposed:
            return TransposedNet(True, bias=True), (BATCH, SEQ, D_IN), (BATCH, SEQ, 2)
        model = conv_pair(CONV1D["stride_padding_dilation"])[0]
        return model, (BATCH, C_IN, LENGTH), (BATCH, 3)

    model, shape, target = build()
    hp = OPTIMIZERS[spec]
    optimizer = factory(spec, **hp)(model)
    data = batches(shape, target, steps=2 * STEPS)
    train(model, optimizer, data[:STEPS], mse)
    resumed = build()[0]
    resumed.load_state_dict(model.state_dict())
    resumed_opt = factory(spec, **hp)(resumed)
    resumed_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    train(model, optimizer, data[STEPS:], mse)
    train(resumed, resumed_opt, data[STEPS:], mse)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_recognition_by_duck_typing():
    assert looks_like_gpt2_conv1d(Conv1D(3, 2))
    assert looks_like_gpt2_conv1d(Conv1D(3, 2, bias=False))
    assert not is_supported(nn.LayerNorm(3))

    class Conv1DWithoutNf(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(2, 3))

    Conv1DWithoutNf.__name__ = "Conv1D"
    assert not is_supported(Conv1DWithoutNf())
    odd = Conv1D(3, 2)
    odd.nf = 2  # disagrees with the weight's shape (2, 3)
    assert not is_supported(odd)


def test_register_transposed_linear(monkeypatch):
    monkeypatch.setattr(
        layers_module, "TRANSPOSED_LINEAR_CHECKS", list(layers_module.TRANSPOSED_LINEAR_CHECKS)
    )

    class MyProjection(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 3))
            self.bias = None

        def forward(self, x):
            return x @ self.weight

    model = nn.Sequential(MyProjection(), nn.Linear(3, 2))
    assert not is_supported(model[0])
    register_transposed_linear(MyProjection)
    assert is_supported(model[0])
    layer = SINGD(model)._layers[0]
    assert (layer.transposed, layer.dim_K, layer.dim_C) == (True, 5, 3)
    with pytest.raises(TypeError):
        register_transposed_linear(3)


def test_real_transformers_conv1d():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D as HFConv1D

    torch.manual_seed(0)
    hf = HFConv1D(D_OUT, D_IN).double()
    nn.init.normal_(hf.weight)
    mine = Conv1D(D_OUT, D_IN).double()
    mine.load_state_dict(hf.state_dict())
    data = batches((BATCH, SEQ, D_IN), (BATCH, SEQ, D_OUT))
    opts = [SINGD(m, lr=0.05, T=1) for m in (hf, mine)]
    for model, opt in zip((hf, mine), opts, strict=True):
        assert opt._layers[0].transposed
        train(model, opt, data, mse)
    assert_round_off([hf.weight, hf.bias], [mine.weight, mine.bias])


# -------------------------------------------------------------------- coverage
class Block(nn.Module):
    """A GPT-2-style block: pre-norm causal attention and MLP with transposed linears."""

    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.attn_proj = Conv1D(3 * d, d), Conv1D(d, d)
        self.c_fc, self.c_proj = Conv1D(4 * d, d), Conv1D(d, 4 * d)

    def forward(self, x):
        B, S, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=-1)
        q, k, v = (t.view(B, S, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(att.transpose(1, 2).reshape(B, S, d))
        return x + self.c_proj(nn.functional.gelu(self.c_fc(self.ln_2(x))))


class TinyGPT2(nn.Module):
    """Token and position embeddings, blocks, final LayerNorm, head tied to ``wte``."""

    def __init__(self, vocab: int = 50, context: int = 16, d: int = 16, n_layer: int = 2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.h = nn.ModuleList(Block(d) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lm_step(model, optimizer, steps=2):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 50, (4, 16), generator=gen)
        optimizer.zero_grad()
        logits = model(ids[:, :-1])
        nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_coverage_of_a_gpt2_style_model(cls):
    torch.manual_seed(0)
    model = TinyGPT2()
    optimizer = cls(model, T=1)
    report = optimizer.coverage()
    assert not report.final
    lm_step(model, optimizer)
    report = optimizer.coverage()
    assert report.final
    d, vocab, context, n_layer = 16, 50, 16, 2
    conv = report.by_type["Conv1D"]
    conv_elements = n_layer * (d * 3 * d + 3 * d + d * d + d + d * 4 * d + 4 * d + 4 * d * d + d)
    assert (conv.preconditioned_tensors, conv.preconditioned_elements) == (
        8 * n_layer // 1,
        conv_elements,
    )
    assert conv.fallback_elements == conv.untrained_elements == 0
    # The tied head claims the embedding matrix: it is preconditioned, as a Linear.
    linear = report.by_type["Linear"]
    assert (linear.preconditioned_tensors, linear.preconditioned_elements) == (1, vocab * d)
    emb = report.by_type["Embedding"]
    assert (emb.fallback_tensors, emb.fallback_elements, emb.fraction) == (1, context * d, 0.0)
    norm = report.by_type["LayerNorm"]
    assert (norm.fallback_tensors, norm.fallback_elements) == (
        2 * (2 * n_layer + 1),
        2 * d * (2 * n_layer + 1),
    )
    total = report.total
    assert total.elements == sum(p.numel() for p in model.parameters())
    assert report.fraction == pytest.approx((conv_elements + vocab * d) / total.elements)
    plain = report.as_dict()
    assert plain["total"]["fraction"] == report.fraction
    assert plain["by_type"]["Conv1D"]["fraction"] == 1.0
    assert "Conv1D" in str(report)


def test_coverage_untrained_frozen_and_silent_layers():
    class Owner(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.proj = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 3)  # its owner uses the weight directly
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

        def forward(self, ids):
            h = self.frozen(self.proj(self.emb(ids)))
            return h @ self.unused.weight.T

    model = Owner()
    with pytest.warns(UserWarning):
        optimizer = SINGD(model, fallback=None, T=1)
    before = optimizer.coverage()
    assert before.by_type["Linear"].preconditioned_tensors == 4
    assert before.by_type["Embedding"].untrained_elements == 40
    assert before.by_type["Linear"].untrained_elements == 20  # the frozen layer
    optimizer.zero_grad()
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    with pytest.warns(UserWarning, match="never ran"):
        optimizer.step()
    after = optimizer.coverage()
    assert after.fallback_layers == ("unused",)
    linear = after.by_type["Linear"]
    assert (linear.preconditioned_elements, linear.untrained_elements) == (20, 20 + 15)
