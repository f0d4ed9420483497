"""The published singd 0.0.5 interface on our classes: import paths, structure class
names and methods, the optimizer's attribute views, the helper modules, and a training
script written the way that package's users write one."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import singd
from singd.optim.layers import KroneckerLayer, layer_dims
from singd.optim.layers import process_input as our_process_input
from singd.structures import STRUCTURE_NAMES, get_structure
from tests.singd.structures.cases import random_structured, random_symmetric

F64 = torch.float64

# Published module -> class names, and the structure each one is (written out here, so
# that a wrong alias cannot pass by being derived from the aliasing code itself).
PUBLISHED_CLASSES = [
    ("dense", "DenseMatrix", "dense"),
    ("diagonal", "DiagonalMatrix", "diagonal"),
    ("blockdiagonal", "Block30DiagonalMatrix", "block30diagonal"),
    ("blockdiagonal", "Block3DiagonalMatrix", "block3diagonal"),
    ("hierarchical", "Hierarchical15_15Matrix", "hierarchical15_15"),
    ("hierarchical", "Hierarchical3_2Matrix", "hierarchical3_2"),
    ("triltoeplitz", "TrilToeplitzMatrix", "triltoeplitz"),
    ("triutoeplitz", "TriuToeplitzMatrix", "triutoeplitz"),
    ("triltopleftdiag", "TrilTopLeftDiagonalMatrix", "triltopleftdiag"),
    ("trilbottomrightdiag", "TrilBottomRightDiagonalMatrix", "trilbottomrightdiag"),
    ("triutopleftdiag", "TriuTopLeftDiagonalMatrix", "triutopleftdiag"),
    ("triubottomrightdiag", "TriuBottomRightDiagonalMatrix", "triubottomrightdiag"),
]
DIM = 37  # above every block size above, not a multiple of any


def published_class(module: str, name: str) -> type:
    return getattr(importlib.import_module(f"singd.structures.{module}"), name)


def test_optimizer_import_path_is_our_singd():
    from singd.optim.optimizer import SINGD

    assert SINGD is singd.SINGD


@pytest.mark.parametrize(("module", "name", "structure"), PUBLISHED_CLASSES)
def test_published_structure_class_is_ours(module, name, structure):
    assert published_class(module, name) is get_structure(structure)


@pytest.mark.parametrize(("module", "name", "structure"), PUBLISHED_CLASSES)
def test_published_class_projects_like_the_float64_reference(module, name, structure):
    """``from_dense`` / ``to_dense`` through the published name: the projection rules of
    REFERENCE.md, checked against the dense reference entry by entry."""
    from tests.singd.structures.cases import reference_projection

    cls = published_class(module, name)
    M = random_symmetric(DIM, torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        cls.from_dense(M).to_dense(), reference_projection(structure, M), rtol=0, atol=1e-12
    )


def test_published_size_attributes_and_any_size():
    from singd.structures.blockdiagonal import Block7DiagonalMatrix, BlockDiagonalMatrixTemplate
    from singd.structures.hierarchical import Hierarchical4_9Matrix, HierarchicalMatrixTemplate

    assert issubclass(Block7DiagonalMatrix, BlockDiagonalMatrixTemplate)
    assert Block7DiagonalMatrix.BLOCK_DIM == 7
    assert issubclass(Hierarchical4_9Matrix, HierarchicalMatrixTemplate)
    assert (Hierarchical4_9Matrix.MAX_K1, Hierarchical4_9Matrix.MAX_K2) == (4, 9)
    assert not hasattr(importlib.import_module("singd.structures.blockdiagonal"), "BlockDiag")
    with pytest.raises(ImportError):
        from singd.structures.hierarchical import HierarchicalMatrix15  # noqa: F401


@pytest.mark.parametrize("name", STRUCTURE_NAMES)
def test_published_methods_against_float64_dense_algebra(name):
    """The published methods' conventions, on a non-symmetric member (as K after a
    step): ``from_inner(X)`` with X of shape (d, n) is ``P(S^T X X^T S)``,
    ``from_mat_inner(X)`` is ``P(X X^T)``, ``rmatmat`` is ``S^T X``; ``+`` and ``*`` make
    new matrices."""
    cls = get_structure(name)
    S, S64 = random_structured(name, DIM, F64, seed=2)
    X = torch.randn(DIM, 5, dtype=F64, generator=torch.Generator().manual_seed(3))

    def close(actual, expected):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)

    close(S.from_inner(X).to_dense(), cls.from_dense(S64.T @ X @ X.T @ S64).to_dense())
    close(S.from_inner().to_dense(), cls.from_dense(S64.T @ S64).to_dense())
    close(cls.from_mat_inner(X).to_dense(), cls.from_dense(X @ X.T).to_dense())
    close(S.rmatmat(X), S64.T @ X)
    T, T64 = random_structured(name, DIM, F64, seed=4)
    before = S64.clone()
    close((S + T).to_dense(), S64 + T64)
    close((S * -0.5).to_dense(), -0.5 * S64)
    close((2.0 * S).to_dense(), 2.0 * S64)
    close(S.to_dense(), before)  # the operands are left as they were
    assert S.shape == torch.Size((DIM, DIM)) == S64.shape
    assert dict(S.named_tensors()) == S.tensors()
    with pytest.raises(ValueError, match=rf"\({DIM}, n\)"):
        S.from_inner(X.T)


def test_block_diagonal_transposes_where_the_published_class_does_not():
    """The published block-diagonal class treats every block as symmetric (its rmatmat is
    ``S X``); ours is right for the non-symmetric K of SINGD: the difference the README
    documents."""
    S, S64 = random_structured("block3diagonal", 7, F64, seed=5)
    X = torch.randn(7, 4, dtype=F64, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(S.rmatmat(X), S64.T @ X)
    assert not torch.allclose(S64.T @ X, S64 @ X)  # so the published answer is wrong here


def test_structures_utils_helpers():
    from singd.structures.utils import all_traces, diag_add_, is_half_precision, supported_eye

    A = torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(7))
    expected = torch.stack([A.diagonal(k).sum() for k in range(-2, 5)])
    torch.testing.assert_close(all_traces(A), expected)
    torch.testing.assert_close(all_traces(A.T), expected.flip(0))
    B = A[:, :3].clone()
    assert diag_add_(B, 2.0) is B
    torch.testing.assert_close(B, A[:, :3] + 2.0 * torch.eye(3, dtype=F64))
    eye = supported_eye(4, dtype=torch.bfloat16)
    assert eye.dtype == torch.bfloat16 and torch.equal(eye, torch.eye(4, dtype=torch.bfloat16))
    assert [is_half_precision(d) for d in (torch.float16, torch.bfloat16, torch.float32)] == [
        True,
        True,
        False,
    ]


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("bias", [True, False])
def test_optim_utils_row_helpers_are_ours(kfac_approx, bias):
    from singd.optim.utils import _extract_averaged_patches, _extract_patches, process_input

    conv = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, groups=2, bias=bias)
    x = torch.randn(3, 4, 9, 9, generator=torch.Generator().manual_seed(8))
    layer = KroneckerLayer("conv", conv, 0, bias, *layer_dims(conv, bias))
    torch.testing.assert_close(
        process_input(x, conv, kfac_approx), our_process_input(x, layer, kfac_approx)
    )
    patches = _extract_patches(x, 3, 2, 1, 1, 2)
    # Dense reference: unfold the group-averaged input by hand (5 x 5 output locations).
    averaged = x.reshape(3, 2, 2, 9, 9).mean(1)
    padded = nn.functional.pad(averaged, (1, 1, 1, 1))
    windows = padded.unfold(2, 3, 2).unfold(3, 3, 2)  # (B, C, 5, 5, 3, 3)
    expected = windows.permute(0, 2, 3, 1, 4, 5).reshape(3, 25, 2 * 9)
    torch.testing.assert_close(patches, expected)
    torch.testing.assert_close(_extract_averaged_patches(x, 3, 2, 1, 1, 2), expected.mean(1))


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, kernel_size=3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(18, 6),
        nn.ReLU(),
        nn.Linear(6, 3),
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 7, 7, generator=generator), torch.randint(
        0, 3, (8,), generator=generator
    )


def test_factor_views_follow_the_optimizer_state():
    """``Ks``, ``Cs``, ``m_Ks``, ``m_Cs``, ``H_Ks``, ``H_Cs`` read the live state: the
    very objects ``curvature_state`` reports, updated by a step, read-only; reading them
    changes no step and adds no state bytes."""
    from singd.optim.optimizer import SINGD

    model, twin = _model(), _model()
    optimizer = SINGD(model, T=1, lr_cov=0.1, structures=("diagonal", "dense"))
    unread = SINGD(twin, T=1, lr_cov=0.1, structures=("diagonal", "dense"))
    names = ["0", "3", "5"]
    assert list(optimizer.module_names.values()) == names
    assert list(optimizer.module_names) == [model[0], model[3], model[5]]
    assert list(optimizer.Ks) == list(optimizer.m_Cs) == names and len(optimizer.Cs) == 3
    assert len(optimizer.H_Ks) == 0 and "0" not in optimizer.H_Cs
    K_before = optimizer.Ks["3"].to_dense().clone()

    inputs, targets = _batch()
    for net in (model, twin):
        nn.functional.cross_entropy(net(inputs), targets).backward()
    assert list(optimizer.H_Ks) == list(optimizer.H_Cs) == names  # accumulated, not yet used
    optimizer.step()
    unread.step()
    assert len(optimizer.H_Ks) == 0

    for view in optimizer.curvature_state():
        for key, mapping in [
            ("K", optimizer.Ks),
            ("C", optimizer.Cs),
            ("m_K", optimizer.m_Ks),
            ("m_C", optimizer.m_Cs),
        ]:
            assert mapping[view.name] is view.factors[key]
    assert not torch.equal(optimizer.Ks["3"].to_dense(), K_before)  # the step moved K
    # Reading the views changed nothing and kept nothing: the same state as the twin's.
    assert optimizer.state_bytes() == unread.state_bytes()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(TypeError):
        optimizer.Ks["3"] = optimizer.Ks["0"]
    with pytest.raises(KeyError):
        optimizer.Ks["1"]  # the ReLU: not a preconditioned layer


def test_momentum_views_are_empty_without_riemannian_momentum():
    from singd.optim.optimizer import SINGD

    optimizer = SINGD(_model(), alpha1=0.0)
    assert len(optimizer.m_Ks) == 0 and len(optimizer.m_Cs) == 0 and len(optimizer.Ks) == 3


def test_supported_structures_group_lookup_and_dims():
    from singd.optim.optimizer import SINGD

    expected = {"dense", "diagonal", "block30diagonal", "hierarchical15_15"}
    expected |= {"triltoeplitz", "triutoeplitz"}
    assert set(SINGD.SUPPORTED_STRUCTURES) == expected
    for name, cls in SINGD.SUPPORTED_STRUCTURES.items():
        assert cls is get_structure(name)
    with pytest.raises(TypeError):
        SINGD.SUPPORTED_STRUCTURES["mine"] = get_structure("dense")
    model = _model()
    groups = [
        {"params": model[0].parameters(), "lr": 0.5},
        {"params": [*model[3].parameters(), *model[5].parameters()]},
    ]
    optimizer = SINGD(model, params=groups, lr=0.1)
    assert optimizer._get_param_group_entry(model[0], "lr") == 0.5
    assert optimizer._get_param_group_entry(model[5], "lr") == 0.1
    with pytest.raises(KeyError):
        optimizer._get_param_group_entry(model[1], "lr")
    assert SINGD.preconditioner_dims(nn.Linear(5, 3)) == (6, 3)
    assert SINGD.preconditioner_dims(nn.Conv2d(4, 6, 3, groups=2, bias=False)) == (18, 6)
    with pytest.raises(NotImplementedError):
        SINGD.preconditioner_dims(nn.BatchNorm1d(3))


def test_a_published_style_parameter_group_script_runs():
    """A training script as the published package's users write one: its import path, a
    dense group for convolutions and a diagonal one for linear layers, then the
    factors' classes read back through ``module_names`` and ``Ks``. The loss falls."""
    from singd.optim.optimizer import SINGD
    from singd.structures.dense import DenseMatrix
    from singd.structures.diagonal import DiagonalMatrix

    model = _model()
    conv = [p for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters()]
    linear = [p for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()]
    settings = {"lr": 0.05, "damping": 1e-4, "T": 1, "lr_cov": 0.05, "alpha1": 0.5}
    optimizer = SINGD(
        model,
        params=[
            {"params": conv, "structures": ("dense", "dense"), **settings},
            {"params": linear, "structures": ("diagonal", "diagonal"), **settings},
        ],
    )
    inputs, targets = _batch()
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    for name, module in model.named_modules():
        if name not in optimizer.module_names.values():
            continue
        expected = DenseMatrix if isinstance(module, nn.Conv2d) else DiagonalMatrix
        assert isinstance(optimizer.Ks[name], expected)
        assert isinstance(optimizer.Cs[name], expected)
