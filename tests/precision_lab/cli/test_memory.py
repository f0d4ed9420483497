"""``precision-lab memory``: the table a user reads, the HTML plot, and bad input."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from plotly.offline import get_plotlyjs

from precision_lab.cli import cli
from precision_lab.memory import build_meta_model, plan_memory
from tests.precision_lab import browser


def _invoke(*args: str):
    # rich sizes its table to $COLUMNS when not writing to a terminal
    return CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["memory", *args])


def test_large_transformer_table_matches_the_plan():
    result = _invoke(
        "--model", "transformer", "--d-model", "4096", "--layers", "32", "--dtype", "bf16"
    )
    assert result.exit_code == 0, result.output
    assert "4,296,527,882 parameters" in result.output and "bfloat16" in result.output
    plan = plan_memory(build_meta_model("transformer", 4096, 32), torch.bfloat16)
    adamw = plan.total("adamw")
    for spec in plan.rows:
        line = next(
            ln for ln in result.output.splitlines() if re.search(rf"\s{re.escape(spec)}\s", ln)
        )
        assert f"{plan.total(spec) / 1e9:.3g}" in line, line  # the table is in GB here
        assert f"{plan.total(spec) / adamw:.2f}x" in line
    # SINGD with diagonal factors holds less than AdamW; dense INGD twice as much
    assert plan.total("singd:diagonal") < adamw < plan.total("ingd")


def test_chosen_optimizers_and_a_users_factory():
    result = _invoke(
        "--model",
        "tests.precision_lab.test_memory:_grouped_conv_net",
        "--optimizers",
        "singd:diagonal,adamw",
    )
    assert result.exit_code == 0, result.output
    rows = [ln for ln in result.output.splitlines() if "singd:" in ln or "adamw" in ln]
    assert len(rows) == 2


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--dtype", "fp8"), "Unknown dtype 'fp8'"),
        (("--optimizers", "singd:nonsense"), "singd:nonsense"),
        (("--model", "cnn", "--layers", "3"), "drop --layers"),
        (("--model", "resnet50"), "Unknown model 'resnet50'"),
        (("--d-model", "0"), "--d-model"),
        (
            ("--d-model", str(10**30)),
            f"--d-model {10**30} is beyond the planner's bound of 1048576",
        ),
        (("--d-model", "1048577", "--model", "mlp"), "bound of 1048576"),
        (
            ("--layers", "1025", "--model", "mlp"),
            "--layers 1025 is beyond the planner's bound of 1024",
        ),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(args, fragment):
    result = _invoke(*args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output


def test_unwritable_plot_path_is_one_sentence(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    result = _invoke("--model", "mlp", "-o", str(blocked / "plan.html"))
    assert result.exit_code == 2 and "Cannot write the plot" in result.output


def test_html_plot_is_self_contained(tmp_path):
    out = tmp_path / "plan.html"
    result = _invoke("--model", "mlp", "--d-model", "1024", "--layers", "4", "-o", str(out))
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert html.count(get_plotlyjs()) == 1 and html.count('class="figure-spec"') == 1
    spec = json.loads(re.search(r'class="figure-spec"[^>]*>(.*?)</script>', html, re.S).group(1))
    sweep = [t for t in spec["data"] if t["type"] == "scatter"]
    widths = np.frombuffer(base64.b64decode(sweep[0]["x"]["bdata"]), sweep[0]["x"]["dtype"])
    assert widths.tolist() == [128, 256, 512, 1024, 2048, 4096, 8192]
    assert spec["layout"]["shapes"][0]["x0"] == 1024  # the planned width, dotted


@pytest.mark.browser
@browser.requires_chromium
def test_html_plot_draws_in_chromium(tmp_path):
    out = tmp_path / "plan.html"
    assert _invoke("--model", "transformer", "--d-model", "256", "-o", str(out)).exit_code == 0
    page = browser.load(out)
    assert page.errors == []
    assert 'data-figures-rendered="1"' in page.dom and 'class="main-svg"' in page.dom


def test_a_billion_layers_is_refused_at_once_by_a_real_process():
    """Before the bound, ``--layers 10**9`` built blocks for more than 300 s."""
    command = [sys.executable, "-m", "precision_lab", "memory", "--layers", str(10**9)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip() == (
        f"Error: --layers {10**9} is beyond the planner's bound of 1024, past which it would "
        "build the model for minutes or overflow its sizes."
    )
