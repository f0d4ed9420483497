"""Optimizer spec strings: parsing, errors, defaults and overrides, building."""

import re

import pytest
import torch
from torch import nn

from precision_lab.errors import UsageError
from precision_lab.specs import DEFAULT_HYPERPARAMETERS, SPEC_FORMS, parse_spec, parse_specs


@pytest.mark.parametrize(
    ("text", "canonical", "family", "structures", "fixed"),
    [
        (
            "singd:diagonal",
            "singd:diagonal",
            "singd",
            ("diagonal", "diagonal"),
            {"structures": ("diagonal", "diagonal"), "kfac_like": False},
        ),
        (
            " SINGD:Hierarchical15_15/dense ",
            "singd:hierarchical15_15/dense",
            "singd",
            ("hierarchical15_15", "dense"),
            {"structures": ("hierarchical15_15", "dense"), "kfac_like": False},
        ),
        (
            "singd:dense/dense",
            "singd:dense",
            "singd",
            ("dense", "dense"),
            {"structures": ("dense", "dense"), "kfac_like": False},
        ),
        (
            "ingd",
            "ingd",
            "singd",
            ("dense", "dense"),
            {"structures": ("dense", "dense"), "kfac_like": False},
        ),
        (
            "ikfac",
            "ikfac",
            "singd",
            ("dense", "dense"),
            {"structures": ("dense", "dense"), "kfac_like": True},
        ),
        (
            "ikfac:block30diagonal",
            "ikfac:block30diagonal",
            "singd",
            ("block30diagonal", "block30diagonal"),
            {"structures": ("block30diagonal", "block30diagonal"), "kfac_like": True},
        ),
        (
            "kfac:cholesky",
            "kfac:cholesky",
            "kfac",
            ("dense", "dense"),
            {"inverse_method": "cholesky"},
        ),
        ("kfac:eigh", "kfac:eigh", "kfac", ("dense", "dense"), {"inverse_method": "eigh"}),
        ("KFAC:INV", "kfac:inv", "kfac", ("dense", "dense"), {"inverse_method": "inv"}),
        (
            "kfac:newton-schulz",
            "kfac:newton-schulz",
            "kfac",
            ("dense", "dense"),
            {"inverse_method": "newton-schulz"},
        ),
        ("adamw", "adamw", "adamw", None, {}),
        ("sgd", "sgd", "sgd", None, {}),
    ],
)
def test_every_documented_form_parses(text, canonical, family, structures, fixed):
    spec = parse_spec(text)
    assert spec.text == canonical
    assert spec.family == family
    assert spec.structures == structures
    assert dict(spec.fixed) == fixed
    assert parse_spec(spec.text) == spec


def test_specs_are_hashable_and_equal_by_their_canonical_text():
    assert len({parse_spec("kfac:eigh"), parse_spec(" KFAC:eigh"), parse_spec("ingd")}) == 2
    assert parse_spec("singd:dense") != parse_spec("ingd")  # same optimizer, other name


def test_structure_label_is_one_name_when_k_and_c_agree():
    assert parse_spec("singd:diagonal").structure == "diagonal"
    assert parse_spec("singd:hierarchical15_15/dense").structure == "hierarchical15_15/dense"
    assert parse_spec("adamw").structure is None


@pytest.mark.parametrize(
    "text",
    ["", "singd", "singd:", "kfac", "kfac:lu", "kfac:eigh/dense", "ingd:dense", "adam", "sgd:x"],
)
def test_unknown_specs_get_one_sentence_listing_the_forms(text):
    with pytest.raises(ValueError) as info:
        parse_spec(text)
    message = str(info.value)
    assert isinstance(info.value, UsageError)
    assert repr(text) in message
    assert all(form in message for form in SPEC_FORMS)
    assert message.count(". ") == 0 and message.endswith(".")


def test_unknown_structure_names_the_bad_structure():
    with pytest.raises(UsageError, match=r"'singd:tridiagonal'.*'tridiagonal'"):
        parse_spec("singd:tridiagonal")
    with pytest.raises(UsageError, match=r"'singd:dense/nope'.*'nope'"):
        parse_spec("singd:dense/nope")
    with pytest.raises(UsageError, match="valid forms are"):
        parse_spec("singd:dense/dense/dense")


def test_non_string_spec_is_a_usage_error():
    with pytest.raises(UsageError, match="must be a string"):
        parse_spec(None)


def test_parse_specs_splits_commas_in_order_and_drops_duplicates():
    specs = parse_specs("kfac:eigh, singd:diagonal,adamw,singd:diagonal/diagonal")
    assert [s.text for s in specs] == ["kfac:eigh", "singd:diagonal", "adamw"]
    with pytest.raises(UsageError, match="comma-separated"):
        parse_specs(" , ")
    with pytest.raises(UsageError, match="'bogus'"):
        parse_specs("adamw,bogus")


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_adamw_and_sgd_build_with_defaults_and_overrides():
    net = model()
    adamw = parse_spec("adamw").build(net)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["lr"] == DEFAULT_HYPERPARAMETERS["adamw"]["lr"]
    sgd = parse_spec("sgd").build(net, {"lr": 0.5, "momentum": 0.0})
    assert isinstance(sgd, torch.optim.SGD)
    assert (sgd.defaults["lr"], sgd.defaults["momentum"]) == (0.5, 0.0)
    assert sum(len(g["params"]) for g in sgd.param_groups) == 4


def test_frozen_parameters_are_left_out():
    net = model()
    net[0].weight.requires_grad_(False)
    sgd = parse_spec("sgd").build(net)
    assert sum(len(g["params"]) for g in sgd.param_groups) == 3


def test_unknown_override_lists_the_valid_hyperparameters():
    with pytest.raises(UsageError, match=r"Unknown hyperparameter 'betas1' for 'adamw'.*betas"):
        parse_spec("adamw").build(model(), {"betas1": 0.9})


def test_the_default_table_is_a_plain_dict_a_user_can_read():
    assert set(DEFAULT_HYPERPARAMETERS) == {"singd", "kfac", "adamw", "sgd"}
    hp = parse_spec("sgd").hyperparameters({"lr": 3.0})
    assert hp == {**DEFAULT_HYPERPARAMETERS["sgd"], "lr": 3.0}
    assert DEFAULT_HYPERPARAMETERS["sgd"]["lr"] != 3.0


def test_singd_specs_build_singd_with_the_structures_the_spec_names():
    from singd import SINGD

    net = model()
    opt = parse_spec("singd:hierarchical15_15/dense").build(net, {"lr": 0.2})
    assert isinstance(opt, SINGD)
    group = opt.param_groups[0]
    assert group["structures"] == ("hierarchical15_15", "dense")
    assert group["lr"] == 0.2 and group["T"] == DEFAULT_HYPERPARAMETERS["singd"]["T"]
    assert group["kfac_like"] is False
    ikfac = parse_spec("ikfac").build(model())
    assert ikfac.param_groups[0]["kfac_like"] is True
    assert ikfac.param_groups[0]["alpha1"] == 0.0  # IKFAC has no Riemannian momentum


@pytest.mark.parametrize("method", ["cholesky", "eigh", "inv", "newton-schulz"])
def test_kfac_specs_build_kfac_with_their_inverse_method(method):
    from singd import KFAC

    opt = parse_spec(f"kfac:{method}").build(model(), {"damping": 0.5})
    assert isinstance(opt, KFAC)
    group = opt.param_groups[0]
    assert group["inverse_method"] == method and group["damping"] == 0.5
    assert group["factor_decay"] == DEFAULT_HYPERPARAMETERS["kfac"]["factor_decay"]


def test_built_optimizers_train_a_model_in_its_current_dtype():
    x = torch.randn(16, 6, dtype=torch.bfloat16)
    for text in ("singd:diagonal", "kfac:eigh", "adamw", "sgd"):
        net = model().to(torch.bfloat16)
        before = [p.detach().clone() for p in net.parameters()]
        opt = parse_spec(text).build(net)
        net(x).square().mean().backward()
        opt.step()
        assert all(p.dtype == torch.bfloat16 for p in net.parameters())
        assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
        if hasattr(opt, "curvature_state"):
            for view in opt.curvature_state():
                for factor in view.factors.values():
                    assert factor.dtype == torch.bfloat16, text


def test_dtype_overrides_accept_names_from_toml():
    opt = parse_spec("kfac:cholesky").build(
        model(), {"factor_dtype": "bf16", "inverse_dtype": "float64"}
    )
    group = opt.param_groups[0]
    assert group["factor_dtype"] == torch.bfloat16 and group["inverse_dtype"] == torch.float64
    opt = parse_spec("singd:diagonal").build(
        model(), {"preconditioner_dtype": ["fp16", "torch.float32"]}
    )
    assert opt.param_groups[0]["preconditioner_dtype"] == (torch.float16, torch.float32)
    with pytest.raises(UsageError, match=r"'factor_dtype' must name a floating dtype.*'int8'"):
        parse_spec("kfac:eigh").build(model(), {"factor_dtype": "int8"})


def test_overrides_cannot_change_what_the_spec_fixes():
    with pytest.raises(UsageError, match=r"'inverse_method' is set by the spec 'kfac:eigh'"):
        parse_spec("kfac:eigh").build(model(), {"inverse_method": "inv"})
    with pytest.raises(UsageError, match=r"'structures' is set by the spec 'singd:diagonal'"):
        parse_spec("singd:diagonal").build(model(), {"structures": ("dense", "dense")})


def test_bad_override_values_get_the_optimizers_own_message():
    with pytest.raises(ValueError, match=r"damping must be a number >= 0, got -1"):
        parse_spec("kfac:inv").build(model(), {"damping": -1})
    with pytest.raises(ValueError, match=r"lr_cov must be a number >= 0, got 'fast'"):
        parse_spec("ingd").build(model(), {"lr_cov": "fast"})


def test_unsupported_layers_go_to_the_fallback_for_kronecker_specs():
    net = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    for text in ("singd:diagonal", "kfac:cholesky"):
        opt = parse_spec(text).build(net)
        assert isinstance(opt.fallback, torch.optim.AdamW)
        covered = {id(p) for g in opt.fallback.param_groups for p in g["params"]}
        assert covered == {id(net[1].weight), id(net[1].bias)}


@pytest.mark.parametrize(
    ("text", "canonical", "plain"),
    [
        ("kfac:cholesky+auto", "kfac:cholesky+auto", "kfac:cholesky"),
        (" KFAC:Newton-Schulz + AUTO ", "kfac:newton-schulz+auto", "kfac:newton-schulz"),
        ("singd:dense+auto", "singd:dense+auto", "singd:dense"),
        ("singd:diagonal/diagonal+auto", "singd:diagonal+auto", "singd:diagonal"),
        ("singd:hierarchical15_15/dense+auto", "singd:hierarchical15_15/dense+auto", None),
        ("ingd+auto", "ingd+auto", "ingd"),
        ("ikfac+auto", "ikfac+auto", "ikfac"),
        ("ikfac:dense+auto", "ikfac+auto", "ikfac"),
    ],
)
def test_auto_suffix_keeps_its_name_and_fixes_precision_auto(text, canonical, plain):
    spec = parse_spec(text)
    assert spec.text == canonical and spec.auto
    assert parse_spec(spec.text) == spec  # the canonical text round-trips
    base = parse_spec(plain or canonical.removesuffix("+auto"))
    assert not base.auto and spec != base  # run ids, baselines and the gate tell them apart
    assert (spec.family, spec.structures) == (base.family, base.structures)
    assert dict(spec.fixed) == {**base.fixed, "precision": "auto"}
    assert "precision" not in base.fixed  # plain specs keep the constructors' default


def test_parse_specs_keeps_plain_and_auto_apart():
    specs = parse_specs("kfac:cholesky,kfac:cholesky+auto,KFAC:cholesky + auto")
    assert [s.text for s in specs] == ["kfac:cholesky", "kfac:cholesky+auto"]


@pytest.mark.parametrize("text", ["adamw+auto", "SGD + auto"])
def test_auto_suffix_on_adamw_or_sgd_is_one_sentence_naming_what_takes_it(text):
    with pytest.raises(UsageError) as info:
        parse_spec(text)
    message = str(info.value)
    assert repr(text) in message and "'+auto'" in message
    assert "SINGD" in message and "KFAC" in message
    assert message.count(". ") == 0 and message.endswith(".")


@pytest.mark.parametrize("text", ["+auto", "kfac+auto", "kfac:cholesky+auto+auto", "ingd+fast"])
def test_malformed_auto_specs_list_the_forms(text):
    with pytest.raises(UsageError, match="valid forms are") as info:
        parse_spec(text)
    assert "SPEC+auto" in str(info.value)


@pytest.mark.parametrize(
    ("text", "precision"),
    [
        ("kfac:cholesky+auto", "auto"),
        ("singd:diagonal+auto", "auto"),
        ("ikfac+auto", "auto"),
        ("kfac:cholesky", None),
        ("singd:diagonal", None),
    ],
)
def test_auto_specs_build_optimizers_with_precision_auto(text, precision):
    opt = parse_spec(text).build(model(), {"lr": 0.1})
    assert opt.precision == precision
    assert opt.param_groups[0]["lr"] == 0.1


def test_precision_is_not_an_override_of_singd_or_kfac_specs():
    for text in ("kfac:cholesky", "singd:dense+auto"):
        expected = rf"'precision' is set by the spec {re.escape(repr(text))}.*'\+auto'"
        with pytest.raises(UsageError, match=expected):
            parse_spec(text).build(model(), {"precision": "auto"})
