"""The gate across seeds: breaking judged by an exact test, not by one unlucky seed."""

from __future__ import annotations

import itertools
import json

import pytest
from click.testing import CliRunner

from precision_lab.cli import cli
from precision_lab.gate.checks import fisher_exact_greater
from tests.precision_lab.gate.test_baseline import assert_one_sentence_error
from tests.precision_lab.gate_runs import seeded_runs, write_run_dir

CONFIG_LABEL = "mlp/baseline/kfac:cholesky/bfloat16/pure/seed*"


def enumerated_p_value(broke_now: int, seeds_now: int, broke_before: int, seeds_before: int):
    """The same p-value by brute force: every way of placing the broken seeds among all."""
    seeds, broken = seeds_now + seeds_before, broke_now + broke_before
    placements = list(itertools.combinations(range(seeds), broken))
    as_extreme = sum(sum(seed < seeds_now for seed in chosen) >= broke_now for chosen in placements)
    return as_extreme / len(placements)


@pytest.mark.parametrize(
    "counts",
    [(5, 5, 0, 5), (1, 5, 0, 5), (0, 5, 0, 5), (3, 4, 1, 6), (2, 3, 2, 3), (0, 2, 3, 3)],
)
def test_fisher_exact_test_matches_enumeration(counts):
    assert fisher_exact_greater(*counts) == pytest.approx(enumerated_p_value(*counts), rel=1e-12)


def test_fisher_exact_test_known_values():
    assert fisher_exact_greater(5, 5, 0, 5) == pytest.approx(1 / 252)
    assert fisher_exact_greater(1, 5, 0, 5) == pytest.approx(0.5)
    assert fisher_exact_greater(0, 5, 0, 5) == 1.0


def seeds_gate(tmp_path, base_broken: int, now_broken: int, *options: str, seeds: int = 5):
    """Gate a run of one configuration over ``seeds`` seeds against a baseline of them."""
    runs, config = seeded_runs(seeds, base_broken)
    base = write_run_dir(tmp_path / "base", runs, config)
    path = tmp_path / "baseline.json"
    made = CliRunner().invoke(cli, ["baseline", str(base), "-o", str(path)])
    assert made.exit_code == 0, made.output
    runs, config = seeded_runs(seeds, now_broken)
    now = write_run_dir(tmp_path / "now", runs, config)
    return CliRunner().invoke(cli, ["gate", str(now), "--baseline", str(path), *options])


def test_breaking_in_five_of_five_seeds_against_none_fails(tmp_path):
    result = seeds_gate(tmp_path, 0, 5, "--json")
    assert result.exit_code == 1, result.output
    data = json.loads(result.output)
    assert data["failures"] == [
        f"{CONFIG_LABEL}: broke in 5 of 5 seeds against 0 of 5 in the baseline (one-sided "
        "Fisher exact test p = 0.00397 < alpha 0.01)"
    ]
    verdict = next(c for c in data["checks"] if c["check"] == "stability.seeds_broken")
    assert (verdict["baseline"], verdict["current"]) == ("0/5", "5/5")
    assert verdict["p_value"] == pytest.approx(1 / 252)
    # No per-seed verdict fails: each seed's divergence, NaN and loss are judged as a whole.
    assert [c for c in data["checks"] if c["status"] == "fail"] == [verdict]


def test_the_table_prints_the_counts_and_the_p_value(tmp_path):
    result = seeds_gate(tmp_path, 0, 5)
    assert result.exit_code == 1, result.output
    row = next(line for line in result.output.splitlines() if "seeds_broken" in line)
    cells = [cell.strip() for cell in row.split("│")[1:-1]]
    assert cells[:6] == ["fail", "stability.seeds_broken", CONFIG_LABEL, "0/5", "5/5", "p=0.00397"]


def test_one_unlucky_seed_of_five_passes(tmp_path):
    result = seeds_gate(tmp_path, 0, 1, "--json")
    assert result.exit_code == 0, result.output
    verdict = next(
        c for c in json.loads(result.output)["checks"] if c["check"] == "stability.seeds_broken"
    )
    assert (verdict["status"], verdict["current"], verdict["p_value"]) == ("ok", "1/5", 0.5)


def test_alpha_sets_the_level(tmp_path):
    # 3 of 5 against 0 of 5: p = 0.083, a failure only at a level above it.
    assert seeds_gate(tmp_path / "a", 0, 3).exit_code == 0
    assert seeds_gate(tmp_path / "b", 0, 3, "--alpha", "0.1").exit_code == 1


def test_breaking_less_often_is_better(tmp_path):
    result = seeds_gate(tmp_path, 5, 0, "--json")
    assert result.exit_code == 0, result.output
    statuses = {c["check"]: c["status"] for c in json.loads(result.output)["checks"]}
    assert statuses["stability.seeds_broken"] == "better"


def test_a_single_seed_baseline_keeps_the_per_run_rule(tmp_path):
    result = seeds_gate(tmp_path, 0, 1, "--json", seeds=1)
    assert result.exit_code == 1, result.output
    data = json.loads(result.output)
    assert not [c for c in data["checks"] if c["check"] == "stability.seeds_broken"]
    assert any("diverged is yes where the baseline had none" in m for m in data["failures"])


def test_other_seeds_than_the_baselines_exit_2(tmp_path):
    runs, config = seeded_runs(5, 0)
    base = write_run_dir(tmp_path / "base", runs, config)
    path = tmp_path / "baseline.json"
    assert CliRunner().invoke(cli, ["baseline", str(base), "-o", str(path)]).exit_code == 0
    runs, config = seeded_runs(3, 0)
    now = write_run_dir(tmp_path / "now", runs, config)
    result = CliRunner().invoke(cli, ["gate", str(now), "--baseline", str(path)])
    assert_one_sentence_error(result, "seeds = [0, 1, 2]", "[0, 1, 2, 3, 4]")


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.01", "often"])
def test_bad_alpha_exits_2(tmp_path, value):
    result = seeds_gate(tmp_path, 0, 0, "--alpha", value)
    assert result.exit_code == 2, result.output
    assert "--alpha" in result.output and value in result.output
    assert "Traceback" not in result.output
