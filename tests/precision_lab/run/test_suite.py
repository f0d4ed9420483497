"""Suites: TOML parsing, one-sentence errors, expansion into runs with float32 controls."""

import pytest
import torch

from precision_lab.errors import UsageError
from precision_lab.run.suite import BUILTIN_SUITES, load_suite, parse_suite

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
        (MINIMAL.replace('"mlp"', '"resnet50"'), "Unknown model 'resnet50'; expected a built-in"),
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


def _stress_with_suite(tmp_path, text, encoding="utf-8"):
    """``precision-lab stress`` on a suite file written with ``text``."""
    from click.testing import CliRunner

    from precision_lab.cli import cli

    path = tmp_path / "suite.toml"
    path.write_text(text, encoding=encoding)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["stress", "--suite", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    (line,) = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert not out.exists()  # refused before anything is written
    return line


ONE_RUN = """
models = ["mlp"]
scenarios = ["baseline"]
optimizers = ["adamw"]
dtypes = ["float32"]
steps = 2
"""


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ("seeds = [true]", "got True"),
        ("seeds = [false, 1]", "got False"),
        ("seeds = [4294967296]", "from 0 to 4294967295, got 4294967296"),
        ("seeds = [99999999999999999999]", "got 99999999999999999999"),
        ("seeds = 3", "seeds must be a non-empty list"),
        ("steps = true", "steps must be a positive integer, got True"),
        ("every = false", "every must be a positive integer"),
        ("name = 123", "name must be a non-empty string, got 123"),
        ('name = ""', "name must be a non-empty string"),
        ("description = [1]", "description must be a non-empty string"),
        ("dtypes = [1]", "dtypes must be a non-empty list of strings, got [1]"),
        ('modes = ["pure", 2]', "modes must be a non-empty list of strings"),
        ("[hyperparameters.adamw]\nbetas = [0.9]", "'adamw' in suite cannot be built"),
        ('[hyperparameters.adamw]\nbetas = "x"', "'adamw' in suite cannot be built"),
        (
            '[hyperparameters.kfac]\nfailure_dir = "../../../../tmp/x"',
            "hyperparameter 'failure_dir' in table 'kfac' names a place to write",
        ),
    ],
)
def test_suite_values_that_would_doom_every_run_are_refused(tmp_path, extra, fragment):
    text = ONE_RUN.replace('dtypes = ["float32"]\n', "") if "dtypes" in extra else ONE_RUN
    text = text.replace("steps = 2\n", "") if extra.startswith("steps") else text
    assert fragment in _stress_with_suite(tmp_path, f"{text}\n{extra}\n")


def test_failure_dir_in_a_spec_table_is_refused_too(tmp_path):
    text = ONE_RUN + '[hyperparameters."kfac:cholesky"]\nfailure_dir = "/tmp/elsewhere"\n'
    assert "names a place to write" in _stress_with_suite(tmp_path, text)


def test_a_utf16_suite_file_is_one_sentence(tmp_path):
    line = _stress_with_suite(tmp_path, ONE_RUN, encoding="utf-16")
    assert "is not UTF-8 text" in line


def test_a_suite_directory_is_one_sentence(tmp_path):
    from click.testing import CliRunner

    from precision_lab.cli import cli

    (tmp_path / "dir.toml").mkdir()
    result = CliRunner().invoke(cli, ["stress", "--suite", str(tmp_path / "dir.toml")])
    assert result.exit_code == 2 and "neither a built-in suite" in result.output


def test_huge_seeds_on_the_command_line_are_refused(tmp_path):
    from click.testing import CliRunner

    from precision_lab.cli import cli

    out = tmp_path / "run"
    args = ["stress", "--suite", "quick", "--seeds", "0,18446744073709551616", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "from 0 to 4294967295" in result.output and not out.exists()
