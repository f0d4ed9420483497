"""Suites: TOML parsing, one-sentence errors, expansion into runs with float32 controls."""

import pytest
import torch

from precision_lab.errors import UsageError
from precision_lab.run.suite import BUILTIN_SUITES, load_suite, parse_suite

MINIMAL = """
models = ["mlp"]
scenarios = ["baseline", "damping=1e-08"]
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


DEFAULT_OPTIMIZERS = {
    "singd:dense",
    "singd:hierarchical15_15",
    "singd:diagonal",
    "ikfac",
    "kfac:cholesky",
    "kfac:newton-schulz",
    "adamw",
}


def test_default_suite_sweeps_damping_and_input_scale_for_every_default_optimizer():
    suite = load_suite("default")
    frontiers = {(f.models, f.knob): f for f in suite.frontiers}
    assert set(frontiers) == {
        (("mlp",), "damping"),
        (("mlp",), "input_scale"),
        (("cnn",), "damping"),
    }
    auto = {"kfac:cholesky+auto", "singd:dense+auto"}
    assert set(frontiers[("mlp",), "input_scale"].optimizers) == DEFAULT_OPTIMIZERS | auto
    assert set(frontiers[("mlp",), "damping"].optimizers) == DEFAULT_OPTIMIZERS - {"adamw"} | auto
    assert set(frontiers[("cnn",), "damping"].optimizers) == DEFAULT_OPTIMIZERS - {"adamw"}
    assert not suite.matrices  # the transformer's baseline did not fit the budget
    plans = suite.plan()
    rungs = {p.scenario for p in plans if p.frontier == "damping"}
    assert "damping=1e-08" in rungs and len(rungs) == 7  # the former tiny_damping
    assert "input_scale=16384" in {p.scenario for p in plans}  # the former near_fp16_max
    assert not any(p.frontier == "damping" and p.family == "adamw" for p in plans)


def test_full_sweeps_every_knob_on_every_model_in_both_modes():
    suite = load_suite("full")
    assert {f.knob for f in suite.frontiers} == {"damping", "input_scale", "loss_scale", "lr_cov"}
    assert all(set(f.models) == {"mlp", "cnn", "transformer"} for f in suite.frontiers)
    (matrix,) = suite.matrices
    assert matrix.scenarios == ("baseline",) and len(matrix.optimizers) == 10
    assert set(suite.modes) == {"pure", "mixed"}


def test_every_low_precision_run_follows_its_float32_control():
    plans = parse_suite(MINIMAL, "t.toml").plan()
    by_id = {p.run_id: p for p in plans}
    low = [p for p in plans if p.dtype != torch.float32]
    # 2 scenarios x 2 optimizers - (damping=1e-08, adamw) = 3 configurations,
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
    assert not any(p.scenario == "damping=1e-08" and p.family == "adamw" for p in plans)


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
    tiny = next(p for p in plans if p.scenario == "damping=1e-08" and p.family == "singd")
    assert base.hyperparameters == {"lr": 0.2, "damping": 0.5}
    assert tiny.hyperparameters == {"lr": 0.2, "damping": 1e-8}
    assert (tiny.frontier, tiny.knob_value) == ("damping", 1e-8)  # a one-rung frontier
    assert tiny.coordinates["frontier"] == "damping" and base.coordinates["frontier"] is None


FRONTIER = """
dtypes = ["bf16"]
steps = 5
[[frontier]]
models = ["mlp"]
knob = "damping"
ladder = [1e-2, 1e-4, 1e-6]
optimizers = ["kfac:cholesky", "singd:diagonal", "adamw"]
"""


def test_every_rung_is_an_ordinary_run_beside_its_float32_control():
    plans = parse_suite(FRONTIER, "t.toml").plan()
    # adamw has no damping: skipped. 2 optimizers x 3 rungs x (control + run).
    assert len(plans) == 12 and {p.family for p in plans} == {"kfac", "singd"}
    ids = [p.run_id for p in plans]
    assert ids[:2] == [
        "mlp/damping=0.01/kfac:cholesky/float32/pure/s0/control-bfloat16-pure",
        "mlp/damping=0.01/kfac:cholesky/bfloat16/pure/s0",
    ]
    assert [p.knob_value for p in plans[::2]] == [1e-2, 1e-4, 1e-6] * 2
    assert all(p.hyperparameters["damping"] == p.knob_value for p in plans)
    assert all(p.condition.name == p.scenario for p in plans)
    assert plans[1].coordinates["knob_value"] == 1e-2


def test_loss_scale_rungs_divide_the_learning_rate_the_suite_sets():
    text = FRONTIER.replace('"damping"', '"loss_scale"').replace(
        "[1e-2, 1e-4, 1e-6]", "[1.0, 0.25]"
    )
    text += "[hyperparameters.singd]\nlr = 0.03\n"
    plans = parse_suite(text, "t.toml").plan()
    lr = {(p.optimizer, p.knob_value): p.hyperparameters.get("lr") for p in plans}
    assert lr[("singd:diagonal", 0.25)] == pytest.approx(0.12)
    assert lr[("kfac:cholesky", 0.25)] == pytest.approx(4e-3)  # the family default 1e-3 x 4
    assert lr[("adamw", 0.25)] is None  # AdamW's step does not follow the gradient's scale
    assert lr[("singd:diagonal", 1.0)] == 0.03


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('"damping"', '"warmth"', "unknown knob 'warmth'; expected one of damping"),
        ("[1e-2, 1e-4, 1e-6]", "[]", "ladder must be a non-empty list"),
        (
            "[1e-2, 1e-4, 1e-6]",
            "[1e-6, 1e-4]",
            r"from the mildest rung .* \(decreasing for damping\)",
        ),
        ("[1e-2, 1e-4, 1e-6]", "[1e-2, 1e-2]", "without repeats"),
        ("[1e-2, 1e-4, 1e-6]", "[1e-2, 0.0]", "damping must be a positive finite number"),
        ("[1e-2, 1e-4, 1e-6]", '["big"]', "damping must be a number"),
        ('"kfac:cholesky", "singd:diagonal", "adamw"', '"adamw", "sgd"', "applies to none"),
        ('knob = "damping"\n', "", "must have exactly the keys models, knob, ladder"),
    ],
)
def test_bad_frontiers_get_one_sentence(old, new, message):
    assert old in FRONTIER
    with pytest.raises(UsageError, match=message) as info:
        parse_suite(FRONTIER.replace(old, new), "user.toml")
    assert "\n" not in str(info.value) and "frontier 1" in str(info.value)


def test_input_scale_ladders_go_up():
    text = FRONTIER.replace('"damping"', '"input_scale"')
    with pytest.raises(UsageError, match=r"\(increasing for input_scale\)"):
        parse_suite(text, "user.toml")


def test_choose_applies_to_frontiers_and_scenarios_select_knobs():
    suite = load_suite("default")
    chosen = suite.choose(models=["mlp"], optimizers=["adamw"], seeds=[1, 2])
    plans = chosen.plan()
    # adamw has no damping: the input_scale frontier is left, on the MLP.
    assert {(p.frontier, p.model, p.optimizer) for p in plans} == {("input_scale", "mlp", "adamw")}
    assert {p.seed for p in plans} == {1, 2}
    only_damping = suite.choose(scenarios=["damping"]).plan()
    assert {p.frontier for p in only_damping} == {"damping"}
    baseline = suite.choose(scenarios=["baseline"], models=["mlp"]).plan()
    assert {p.scenario for p in baseline} == {"baseline"} and len(baseline) == 2 * 9
    with pytest.raises(UsageError, match="is now the rung input_scale=16384"):
        suite.choose(scenarios=["near_fp16_max"])
    with pytest.raises(UsageError, match="nothing left to run"):
        suite.choose(scenarios=["lr_cov"])


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
