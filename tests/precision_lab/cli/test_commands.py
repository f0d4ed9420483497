"""The command line's contract: exit codes and one-sentence errors without tracebacks."""

import pytest
import torch
from click.testing import CliRunner

from precision_lab import __version__
from precision_lab.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def assert_usage_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    (line,) = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    for fragment in fragments:
        assert fragment in line


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--dtype", "fp8"], ["Unknown dtype 'fp8'", "bf16"]),
        (["--dtype", "bf16", "--optimizers", "kfac:magic"], ["Unknown optimizer spec"]),
        (["--optimizers", "singd:wiggly"], ["singd:wiggly"]),
        (["--models", "resnet50"], ["Unknown model 'resnet50'", "mlp"]),
        (["--scenarios", "rain"], ["Unknown scenario 'rain'"]),
        (["--mode", "half"], ["Unknown mode 'half'"]),
        (["--seeds", "0,x"], ["--seeds", "'0,x'"]),
        (["--suite", "nowhere.toml"], ["'nowhere.toml'", "quick"]),
    ],
)
def test_bad_input_exits_2_with_one_sentence(args, fragments):
    assert_usage_error(invoke("stress", *args), *fragments)


def test_bad_toml_exits_2(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("models = [\n")
    assert_usage_error(invoke("stress", "--suite", str(path)), "is not valid TOML")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_exits_2():
    assert_usage_error(invoke("stress", "--device", "cuda"), "CUDA is not available")


def test_click_range_errors_exit_2():
    result = invoke("stress", "--steps", "0")
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_help_and_version():
    result = invoke("--help")
    assert result.exit_code == 0 and "stress" in result.output
    assert invoke("--version").output.strip().endswith(__version__)
    help_text = invoke("stress", "--help").output
    for option in ("--dtype", "--mode", "--suite", "--optimizers", "--seeds", "--device", "--out"):
        assert option in help_text


def test_no_run_directory_is_left_after_a_usage_error(tmp_path):
    out = tmp_path / "run"
    assert invoke("stress", "--dtype", "fp8", "--out", str(out)).exit_code == 2
    assert not out.exists()
