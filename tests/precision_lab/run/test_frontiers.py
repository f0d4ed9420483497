"""Breaking points, costs and verdicts from hand-made run objects (the frontier schema)."""

from __future__ import annotations

import pytest

from precision_lab.run.frontiers import frontier_entries, median_cost

DAMPING = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5]


def _run(value, dtype, outcome, *, knob="damping", seed=0, optimizer="kfac:cholesky"):
    """A finished rung: outcome ``held``, ``broke`` (diverged), ``crashed``,
    ``no_learning``, ``unfinished`` (planned, never run)."""
    rung = f"{knob}={format(value, 'g')}"
    run_id = f"mlp/{rung}/{optimizer}/bfloat16/pure/s{seed}"
    control = dtype == "float32"
    return {
        "run": f"{run_id.replace('bfloat16', 'float32')}/control-bfloat16-pure"
        if control
        else run_id,
        "model": "mlp",
        "scenario": rung,
        "frontier": knob,
        "knob_value": value,
        "optimizer": optimizer,
        "dtype": dtype,
        "mode": "pure",
        "seed": seed,
        "control_of": run_id if control else None,
        "finished": outcome != "unfinished",
        "diverged": outcome == "broke",
        "error": "RuntimeError: cholesky" if outcome == "crashed" else None,
        "learned": None if outcome in ("crashed", "unfinished") else outcome == "held",
    }


def _ladder(run_outcomes, control_outcomes, ladder=DAMPING, **kw):
    runs = []
    for value, ours, theirs in zip(ladder, run_outcomes, control_outcomes, strict=True):
        if theirs is not None:
            runs.append(_run(value, "float32", theirs, **kw))
        if ours is not None:
            runs.append(_run(value, "bfloat16", ours, **kw))
    return runs


def _one(runs):
    (entry,) = frontier_entries(runs)
    return entry


H, B = "held", "broke"


def test_held_everywhere():
    entry = _one(_ladder([H] * 5, [H] * 5))
    assert entry["ladder"] == DAMPING
    assert entry["breaking_point"] is None and entry["control_breaking_point"] is None
    assert entry["precision_cost"] == 0 and not entry["cost_lower_bound"]
    assert entry["verdict"] == "held everywhere"
    assert [r["status"] for r in entry["rungs"]] == [H] * 5
    assert entry["rungs"][0]["control"].endswith("/control-bfloat16-pure")


def test_broke_everywhere():
    entry = _one(_ladder([B, "crashed", B, B, B], [B] * 5))
    assert entry["breaking_point"] == 1e-1 and entry["control_breaking_point"] == 1e-1
    assert entry["precision_cost"] == 0
    assert entry["verdict"] == "broke everywhere"
    assert entry["rungs"][1]["status"] == "broke"  # raising is breaking


def test_cost_two_rungs():
    entry = _one(_ladder([H, H, B, B, B], [H, H, H, H, B]))
    assert entry["breaking_point"] == 1e-3
    assert entry["control_breaking_point"] == 1e-5
    assert entry["precision_cost"] == 2 and not entry["cost_lower_bound"]
    assert entry["monotone"] and entry["control_monotone"]
    assert entry["verdict"] == "costs 2 rungs"


def test_control_held_everywhere_gives_a_lower_bound():
    entry = _one(_ladder([H, H, H, B, B], [H] * 5))
    assert entry["precision_cost"] == 2 and entry["cost_lower_bound"]
    assert entry["verdict"] == "costs at least 2 rungs"


def test_run_broken_at_the_mildest_rung_gives_a_lower_bound():
    entry = _one(_ladder([B, B, B, B, B], [H, B, B, B, B]))
    assert entry["precision_cost"] == 1 and entry["cost_lower_bound"]
    assert entry["verdict"] == "costs at least 1 rung"


def test_breaking_later_than_float32_is_a_negative_cost():
    entry = _one(_ladder([H, H, H, B, B], [H, H, B, B, B]))
    assert entry["precision_cost"] == -1
    assert entry["verdict"] == "breaks later than float32 (-1 rungs)"


def test_non_monotone_ladder_is_flagged():
    entry = _one(_ladder([H, B, H, B, B], [H, H, H, B, B]))
    assert entry["breaking_point"] == 1e-2  # the mildest rung that broke
    assert not entry["monotone"] and entry["control_monotone"]
    assert entry["precision_cost"] == 2
    assert entry["verdict"] == "costs 2 rungs; non-monotone"


def test_missing_rung_before_the_breaking_point_makes_the_cost_unknown():
    entry = _one(_ladder([H, "unfinished", B, B, B], [H, H, H, B, B]))
    assert entry["rungs"][1]["status"] == "missing"
    assert entry["breaking_point"] == 1e-3  # the mildest rung seen broken
    assert entry["precision_cost"] is None
    assert entry["verdict"] == "unknown (1 rung missing)"


def test_missing_rung_after_both_breaking_points_leaves_the_cost_known():
    """An interrupted suite: the harshest rung never ran, both broke before it."""
    entry = _one(_ladder([H, B, B, B, "unfinished"], [H, H, B, B, None]))
    assert entry["rungs"][4]["status"] == "missing"
    assert entry["rungs"][4]["control_status"] == "missing" and entry["rungs"][4]["control"] is None
    assert entry["precision_cost"] == 1
    assert entry["verdict"] == "costs 1 rung"


def test_missing_control_when_nothing_broke_is_unknown():
    entry = _one(_ladder([H] * 5, [H, H, H, H, None]))
    assert entry["precision_cost"] is None
    assert entry["verdict"].startswith("unknown")


def test_control_that_did_not_learn_is_no_learning_not_held():
    entry = _one(_ladder([H, H, B, B, B], [H, "no_learning", "no_learning", B, B]))
    assert [r["control_status"] for r in entry["rungs"]][:3] == [H, "no_learning", "no_learning"]
    assert entry["control_breaking_point"] == 1e-4
    assert entry["precision_cost"] == 1
    assert entry["verdict"] == "costs 1 rung; float32 did not learn at 0.001"


def test_ladder_is_ordered_mildest_first_whatever_the_run_order():
    """input_scale grows harsher upwards, damping downwards; runs arrive in any order."""
    scales = [1.0, 256.0, 16384.0]
    runs = _ladder([H, H, B], [H, H, H], ladder=scales, knob="input_scale")
    entry = _one(list(reversed(runs)))
    assert entry["ladder"] == scales and entry["breaking_point"] == 16384.0
    entry = _one(list(reversed(_ladder([H, H, B, B, B], [H] * 5))))
    assert entry["ladder"] == DAMPING


def test_one_entry_per_key_and_float32_runs_and_baselines_are_no_entries():
    runs = _ladder([H] * 5, [H] * 5) + _ladder([H] * 5, [H] * 5, seed=1)
    runs += _ladder([H] * 5, [H] * 5, optimizer="singd:diagonal")
    plain_fp32 = dict(runs[0], control_of=None, run="mlp/damping=0.1/kfac:cholesky/float32/pure/s0")
    baseline = dict(runs[1], frontier=None, knob_value=None, scenario="baseline", run="x")
    entries = frontier_entries([*runs, plain_fp32, baseline])
    keys = {(e["optimizer"], e["seed"]) for e in entries}
    assert keys == {("kfac:cholesky", 0), ("kfac:cholesky", 1), ("singd:diagonal", 0)}
    assert all(e["dtype"] == "bfloat16" and e["knob"] == "damping" for e in entries)


@pytest.mark.parametrize(
    ("seeds", "expected"),
    [([[H, B, B, B, B], [H, H, H, B, B], [H, H, B, B, B]], 2), ([[H] * 5, None], None)],
)
def test_median_cost_over_seeds(seeds, expected):
    runs = []
    for seed, outcomes in enumerate(seeds):
        ours = outcomes or [H, "unfinished", H, H, H]
        runs += _ladder(ours, [H, H, H, H, B], seed=seed)
    medians = median_cost(frontier_entries(runs))
    assert medians == {("mlp", "damping", "kfac:cholesky", "bfloat16", "pure"): expected}
