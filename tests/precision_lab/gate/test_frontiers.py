"""The gate on breaking points: a frontier that moved milder fails, harsher is reported
better, seeds are judged by an exact test, and old baselines stay readable.

Every gate here is the real command (``precision-lab baseline`` / ``gate``) on real run
directories written with the frontier schema (tests/precision_lab/frontier_runs.py).
"""

from __future__ import annotations

import itertools
import json
import random

import pytest
from click.testing import CliRunner

from precision_lab.cli import cli
from precision_lab.gate.baseline import read_baseline
from precision_lab.gate.checks import fisher_exact_greater
from precision_lab.gate.frontiers import permutation_p_lower
from tests.precision_lab.frontier_runs import frontier_runs, write_frontier_dir
from tests.precision_lab.gate.test_baseline import assert_one_sentence_error

KFAC = "mlp/damping/kfac:cholesky/bfloat16/pure/seed0"
SINGD = "mlp/damping/singd:diagonal/bfloat16/pure/seed0"
# KFAC breaks at 1e-4 in bfloat16 and at 1e-6 in float32; SINGD holds everywhere in both.
BASE = {"kfac:cholesky": ("HHHBBB", "HHHHHB"), "singd:diagonal": ("HHHHHH", "HHHHHH")}


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def make_baseline(tmp_path, patterns=BASE, seeds=(0,)) -> tuple:
    runs = [run for seed in seeds for run in frontier_runs(patterns, seed=seed)]
    base = write_frontier_dir(tmp_path / "base", runs)
    path = tmp_path / "baseline.json"
    made = invoke("baseline", base, "-o", path)
    assert made.exit_code == 0, made.output
    return base, path


def gate_json(tmp_path, baseline, patterns, seeds=(0,), name="now"):
    runs = [run for seed in seeds for run in frontier_runs(patterns, seed=seed)]
    run_dir = write_frontier_dir(tmp_path / name, runs)
    result = invoke("gate", run_dir, "--baseline", baseline, "--json")
    return result, json.loads(result.output) if result.output.startswith("{") else None


def frontier_verdicts(data) -> dict[tuple[str, str], dict]:
    return {(v["check"], v["run"]): v for v in data["checks"] if "frontier" in v["check"]}


def test_the_baseline_stores_each_frontiers_breaking_points(tmp_path):
    _, path = make_baseline(tmp_path)
    document = json.loads(path.read_text())
    stored = {tuple(f["key"].values()): f for f in document["frontiers"]}
    kfac = stored["mlp", "damping", "kfac:cholesky", "bfloat16", "pure", 0]
    assert kfac["ladder"] == [0.1, 0.01, 0.001, 1e-4, 1e-5, 1e-6]
    assert kfac["breaking_point"] == 1e-4 and kfac["control_breaking_point"] == 1e-6
    assert kfac["statuses"] == ["held"] * 3 + ["broke"] * 3
    singd = stored["mlp", "damping", "singd:diagonal", "bfloat16", "pure", 0]
    assert singd["breaking_point"] is None and singd["control_breaking_point"] is None
    assert len(read_baseline(path).frontiers) == 2


def test_an_unchanged_frontier_passes(tmp_path):
    _, path = make_baseline(tmp_path)
    result, data = gate_json(tmp_path, path, BASE)
    assert result.exit_code == 0, result.output
    verdicts = frontier_verdicts(data)
    assert len(verdicts) == 4  # two frontiers, the dtype's and the control's breaking point
    kfac = verdicts["frontier.breaking_point", KFAC]
    assert (kfac["status"], kfac["baseline"], kfac["current"]) == ("ok", "0.0001", "0.0001")
    singd = verdicts["frontier.control_breaking_point", SINGD]
    assert (singd["status"], singd["current"]) == ("ok", "held everywhere")


def test_a_breaking_point_moved_milder_fails(tmp_path):
    _, path = make_baseline(tmp_path)
    moved = {**BASE, "kfac:cholesky": ("HBBBBB", "HHHHHB")}
    result, data = gate_json(tmp_path, path, moved)
    assert result.exit_code == 1, result.output
    verdict = frontier_verdicts(data)["frontier.breaking_point", KFAC]
    assert verdict["status"] == "fail" and verdict["change"] == "2 rungs milder"
    assert (
        f"{KFAC}: breaking point moved 2 rungs milder: breaks at 0.01 where the baseline "
        in (verdict["message"])
    )
    assert verdict["message"] in data["failures"]
    # The table names it too, and says why the gate failed.
    table = invoke("gate", tmp_path / "now", "--baseline", path)
    assert table.exit_code == 1 and "frontier.breaking_point" in table.output
    assert "2 rungs milder" in table.output


def test_a_breaking_point_that_held_where_it_broke_is_reported_better(tmp_path):
    _, path = make_baseline(tmp_path)
    better = {**BASE, "kfac:cholesky": ("HHHHHB", "HHHHHB")}
    result, data = gate_json(tmp_path, path, better)
    assert result.exit_code == 0, result.output
    verdict = frontier_verdicts(data)["frontier.breaking_point", KFAC]
    assert (verdict["status"], verdict["change"]) == ("better", "2 rungs harsher")
    assert data["counts"]["better"] >= 1


def test_a_control_that_breaks_earlier_fails_its_own_check(tmp_path):
    _, path = make_baseline(tmp_path)
    moved = {**BASE, "singd:diagonal": ("HHHHHH", "HHHHBB")}
    result, data = gate_json(tmp_path, path, moved)
    assert result.exit_code == 1
    verdicts = frontier_verdicts(data)
    assert verdicts["frontier.control_breaking_point", SINGD]["status"] == "fail"
    assert verdicts["frontier.breaking_point", SINGD]["status"] == "ok"
    assert (
        "control breaking point moved 2 rungs milder"
        in (verdicts["frontier.control_breaking_point", SINGD]["message"])
    )


def test_no_learning_is_not_breaking(tmp_path):
    """A rung that stops learning without breaking leaves the breaking point where it was
    (the per-run checks see the loss)."""
    _, path = make_baseline(tmp_path)
    _, data = gate_json(tmp_path, path, {**BASE, "singd:diagonal": ("HHHHNN", "HHHHHH")})
    assert frontier_verdicts(data)["frontier.breaking_point", SINGD]["status"] == "ok"


def test_a_missing_rung_leaves_the_breaking_point_unknown(tmp_path):
    _, path = make_baseline(tmp_path)
    result, data = gate_json(tmp_path, path, {**BASE, "kfac:cholesky": ("HMHBBB", "HHHHHB")})
    assert result.exit_code == 1  # the unfinished run fails coverage.run
    verdict = frontier_verdicts(data)["frontier.breaking_point", KFAC]
    assert verdict["status"] == "skip" and "unknown" in verdict["message"]
    assert verdict["current"] == "unknown"
    assert any(v["check"] == "coverage.run" and v["status"] == "fail" for v in data["checks"])


def test_a_rung_removed_from_the_summary_is_missing_not_another_ladder(tmp_path):
    _, path = make_baseline(tmp_path)
    runs = frontier_runs(BASE)
    gone = "mlp/damping=0.01/kfac:cholesky/bfloat16/pure/s0"
    runs = [run for run in runs if gone not in run["run"]]  # the rung and its control
    result = invoke("gate", write_frontier_dir(tmp_path / "now", runs), "--baseline", path)
    assert result.exit_code == 1, result.output  # coverage.run: the rung is missing
    data = json.loads(invoke("gate", tmp_path / "now", "--baseline", path, "--json").output)
    verdict = frontier_verdicts(data)["frontier.breaking_point", KFAC]
    assert verdict["status"] == "skip" and verdict["current"] == "unknown"
    assert frontier_verdicts(data)["frontier.breaking_point", SINGD]["status"] == "ok"


def test_a_frontier_missing_from_the_run_directory_fails(tmp_path):
    _, path = make_baseline(tmp_path)
    result, data = gate_json(tmp_path, path, {"kfac:cholesky": BASE["kfac:cholesky"]})
    assert result.exit_code == 1
    missing = frontier_verdicts(data)["coverage.frontier", SINGD]
    assert missing["status"] == "fail" and "missing from" in missing["message"]


def test_a_new_frontier_is_reported_new(tmp_path):
    _, path = make_baseline(tmp_path, {"kfac:cholesky": BASE["kfac:cholesky"]})
    result, data = gate_json(tmp_path, path, BASE)
    assert result.exit_code == 0, result.output
    assert frontier_verdicts(data)["coverage.frontier", SINGD]["status"] == "new"


def test_another_ladder_cannot_be_compared(tmp_path):
    _, path = make_baseline(tmp_path)
    runs = frontier_runs(BASE, ladder=(1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-7))
    # the same scenarios but one: the gate must not compare positions on two ladders
    run_dir = write_frontier_dir(tmp_path / "other", runs)
    result = invoke("gate", run_dir, "--baseline", path)
    assert_one_sentence_error(result, "climbs the ladder", "refresh the baseline")


def test_a_run_directory_naming_an_unknown_knob_exits_2(tmp_path):
    _, path = make_baseline(tmp_path)
    runs = frontier_runs(BASE)
    for run in runs:
        run["frontier"] = "warp_factor"
    result = invoke("gate", write_frontier_dir(tmp_path / "now", runs), "--baseline", path)
    assert_one_sentence_error(result, "summary.json", "Unknown knob 'warp_factor'")


def test_a_baseline_without_frontiers_is_read_and_gates_none(tmp_path):
    """Baselines written before frontiers existed: readable, no frontier is judged (each
    is reported new)."""
    _, path = make_baseline(tmp_path)
    document = json.loads(path.read_text())
    del document["frontiers"]
    path.write_text(json.dumps(document))
    assert read_baseline(path).frontiers == {}
    moved = {**BASE, "kfac:cholesky": ("BBBBBB", "HHHHHB")}
    result, data = gate_json(tmp_path, path, moved)
    statuses = {v["status"] for v in frontier_verdicts(data).values()}
    assert statuses == {"new"}
    # the broken rungs still fail their per-run checks: the gate is not blind
    assert result.exit_code == 1
    assert all("frontier" not in message for message in data["failures"])


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda f: f.update(breaking_point=1e-6), ["breaking_point = 1e-06", "break at 0.0001"]),
        (lambda f: f["statuses"].__setitem__(0, "exploded"), ["statuses", "one of held"]),
        (lambda f: f["control_statuses"].pop(), ["one per rung (6)"]),
        (lambda f: f.update(ladder="0.1..1e-6"), ["ladder", "list of numbers"]),
        (lambda f: f["key"].update(seed="0"), ["seed an integer"]),
    ],
)
def test_a_tampered_frontier_in_a_baseline_exits_2(tmp_path, edit, words):
    base, path = make_baseline(tmp_path)
    document = json.loads(path.read_text())
    edit(document["frontiers"][0])
    path.write_text(json.dumps(document))
    result = invoke("gate", base, "--baseline", path)
    assert_one_sentence_error(result, str(path), "frontier", *words)


# -- several seeds ---------------------------------------------------------------------


def enumerated_p(current: list[int], baseline: list[int]) -> float:
    """The permutation p-value by brute force: every choice of the current seeds."""
    pooled = [*current, *baseline]
    splits = list(itertools.combinations(range(len(pooled)), len(current)))
    low = sum(sum(pooled[i] for i in chosen) <= sum(current) for chosen in splits)
    return low / len(splits)


def test_the_permutation_test_matches_enumeration():
    rng = random.Random(3)
    for _ in range(40):
        current = [rng.randrange(7) for _ in range(rng.randrange(1, 6))]
        baseline = [rng.randrange(7) for _ in range(rng.randrange(1, 6))]
        assert permutation_p_lower(current, baseline) == pytest.approx(
            enumerated_p(current, baseline), rel=1e-12
        )


@pytest.mark.parametrize(
    "counts", [(5, 5, 0, 5), (1, 5, 0, 5), (0, 5, 0, 5), (3, 4, 1, 6), (2, 3, 2, 3)]
)
def test_on_a_one_rung_ladder_it_is_fishers_test(counts):
    """Position 0 = broke at the only rung, 1 = held: the same p-value as seeds_broken's."""
    broke_now, seeds_now, broke_before, seeds_before = counts
    now = [0] * broke_now + [1] * (seeds_now - broke_now)
    before = [0] * broke_before + [1] * (seeds_before - broke_before)
    assert permutation_p_lower(now, before) == pytest.approx(fisher_exact_greater(*counts))


SEEDS = range(5)
CONFIG_LABEL = "mlp/damping/kfac:cholesky/bfloat16/pure/seed*"


def seeded(tmp_path, moved_seeds: int):
    _, path = make_baseline(tmp_path, seeds=SEEDS)
    runs = []
    for seed in SEEDS:
        pattern = ("HBBBBB", "HHHHHB") if seed < moved_seeds else BASE["kfac:cholesky"]
        runs += frontier_runs({**BASE, "kfac:cholesky": pattern}, seed=seed)
    run_dir = write_frontier_dir(tmp_path / "now", runs)
    result = invoke("gate", run_dir, "--baseline", path, "--json")
    return result, json.loads(result.output)


def test_every_seed_breaking_milder_fails_the_exact_test(tmp_path):
    result, data = seeded(tmp_path, 5)
    assert result.exit_code == 1, result.output
    verdict = frontier_verdicts(data)["frontier.breaking_point", CONFIG_LABEL]
    assert verdict["status"] == "fail"
    assert verdict["p_value"] == pytest.approx(1 / 252)
    assert verdict["current"] == "median 0.01 (0.01, 0.01, 0.01, 0.01, 0.01)"
    assert verdict["baseline"] == "median 0.0001 (0.0001, 0.0001, 0.0001, 0.0001, 0.0001)"
    assert "one-sided permutation test p = 0.00397 < alpha 0.01" in verdict["message"]
    # judged once per configuration, not seed by seed
    assert not any(v["run"].endswith("seed0") for v in frontier_verdicts(data).values())


def test_one_unlucky_seed_of_five_passes(tmp_path):
    result, data = seeded(tmp_path, 1)
    verdict = frontier_verdicts(data)["frontier.breaking_point", CONFIG_LABEL]
    assert verdict["status"] == "ok" and verdict["p_value"] == pytest.approx(0.5)
    assert verdict["current"].startswith("median 0.0001 (0.01, 0.0001")
    assert not any("frontier" in message for message in data["failures"])
