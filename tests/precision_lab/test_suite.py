"""Suites: TOML parsing, one-sentence errors, expansion into runs with float32 controls."""

import pytest
import torch

from precision_lab.errors import UsageError
from precision_lab.suite import BUILTIN_SUITES, load_suite, parse_suite

MINIMAL = """
models = ["mlp"]
scenarios = ["baseline", "tiny_damping"]
optimizers = ["singd:diagonal", "adamw"]
dtypes = ["bf16", "fp16"]
modes = ["pure", "mixed"]
seeds = [0, 1]
steps = 5
"""


@pytest.mark.parametrize("name", BUILTIN_SUITES)
def test_builtin_suites_load_and_plan_unique_runs(name):
    suite = load_suite(name)
    plans = suite.plan()
    ids = [p.run_id for p in plans]
    assert len(ids) == len(set(ids))
    assert suite.name == name


def test_default_suite_has_the_seven_default_optimizers_and_every_scenario():
    suite = load_suite("default")
    optimizers = {o for m in suite.matrices for o in m.optimizers}
    assert optimizers == {
        "singd:dense",
        "singd:hierarchical15_15",
        "singd:diagonal",
        "ikfac",
        "kfac:cholesky",
        "kfac:newton-schulz",
        "adamw",
    }
    scenarios = {s for m in suite.matrices for s in m.scenarios}
    assert len(scenarios) == 6
    assert {m for x in suite.matrices for m in x.models} == {"mlp", "cnn", "transformer"}


def test_full_is_the_whole_cross_product():
    suite = load_suite("full")
    (matrix,) = suite.matrices
    assert set(matrix.models) == {"mlp", "cnn", "transformer"}
    assert len(matrix.scenarios) == 6
    assert set(suite.modes) == {"pure", "mixed"}


def test_every_low_precision_run_follows_its_float32_control():
    plans = parse_suite(MINIMAL, "t.toml").plan()
    by_id = {p.run_id: p for p in plans}
    low = [p for p in plans if p.dtype != torch.float32]
    # 2 scenarios x 2 optimizers - (tiny_damping, adamw) = 3 configurations,
    # x 2 dtypes x 2 modes x 2 seeds.
    assert len(low) == 3 * 2 * 2 * 2
    assert len(plans) == 2 * len(low)
    for i, plan in enumerate(plans):
        if plan.control_of is not None:
            run = by_id[plan.control_of]
            assert plans[i + 1] is run  # the control runs first, then what it controls
            assert plan.dtype == torch.float32 and plan.mode == "pure"
            same = ("model", "scenario", "optimizer", "seed", "hyperparameters", "steps")
            assert all(getattr(plan, f) == getattr(run, f) for f in same)
    assert not any(p.scenario == "tiny_damping" and p.family == "adamw" for p in plans)


def test_run_ids_are_readable():
    plans = parse_suite(MINIMAL, "t.toml").plan()
    ids = {p.run_id for p in plans}
    assert "mlp/baseline/singd:diagonal/bfloat16/pure/s0" in ids
    assert "mlp/baseline/singd:diagonal/float32/pure/s1/control-float16-mixed" in ids
    run = next(p for p in plans if p.run_id.endswith("float16/mixed/s1"))
    assert run.config_key == run.run_id.replace("/s1", "/s*")


def test_float32_only_has_no_controls():
    plans = parse_suite(MINIMAL, "t.toml").choose(dtypes=[torch.float32]).plan()
    assert plans and all(p.control_of is None and p.dtype == torch.float32 for p in plans)
    assert {p.mode for p in plans} == {"pure"}


def test_hyperparameters_merge_family_then_spec_then_scenario():
    text = MINIMAL + (
        "[hyperparameters.singd]\nlr = 0.1\ndamping = 0.5\n"
        '[hyperparameters."singd:diagonal"]\nlr = 0.2\n'
    )
    plans = parse_suite(text, "t.toml").plan()
    base = next(p for p in plans if p.scenario == "baseline" and p.family == "singd")
    tiny = next(p for p in plans if p.scenario == "tiny_damping" and p.family == "singd")
    assert base.hyperparameters == {"lr": 0.2, "damping": 0.5}
    assert tiny.hyperparameters == {"lr": 0.2, "damping": 1e-8}


def test_choose_replaces_the_suites_lists():
    suite = load_suite("default").choose(
        models=["cnn"], optimizers=["kfac:eigh"], seeds=[3, 4], steps=2
    )
    plans = suite.plan()
    assert {p.model for p in plans} == {"cnn"}
    assert {p.optimizer for p in plans} == {"kfac:eigh"}
    assert {p.seed for p in plans} == {3, 4}
    assert {p.steps for p in plans} == {2}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models = [", "is not valid TOML"),
        (MINIMAL + "colour = 1\n", "unknown key 'colour'"),
        (MINIMAL.replace('"mlp"', '"resnet"'), "unknown model 'resnet'"),
        (MINIMAL.replace('"baseline"', '"rain"'), "Unknown scenario 'rain'"),
        (MINIMAL.replace('"adamw"', '"adamw:fast"'), "Unknown optimizer spec 'adamw:fast'"),
        (MINIMAL.replace('"bf16"', '"fp8"'), "Unknown dtype 'fp8'"),
        (MINIMAL.replace('"mixed"', '"half"'), "Unknown mode 'half'"),
        (MINIMAL.replace("steps = 5", "steps = 0"), "steps must be a positive integer"),
        ('dtypes = ["bf16"]\n', "lists no runs"),
        (MINIMAL + "[[matrix]]\nmodels = ['mlp']\n", "must have exactly the keys"),
        (MINIMAL + "[hyperparameters.lion]\nlr = 1\n", "neither an optimizer family"),
        (MINIMAL + "[hyperparameters.adamw]\nbetas3 = 1\n", "Unknown hyperparameter 'betas3'"),
        (MINIMAL + "[hyperparameters.adamw]\nlr = -1.0\n", "learning rate: -1.0"),
    ],
)
def test_bad_suites_get_one_sentence(text, message):
    with pytest.raises(UsageError, match=message) as info:
        parse_suite(text, "user.toml").plan()
    assert "\n" not in str(info.value)


def test_missing_suite_file():
    with pytest.raises(UsageError, match="neither a built-in suite .* nor an existing TOML file"):
        load_suite("nowhere.toml")


def test_user_suite_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(MINIMAL)
    suite = load_suite(str(path))
    assert suite.name == "mine" and suite.text == MINIMAL
