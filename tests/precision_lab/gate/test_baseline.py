"""Baselines: what `precision-lab baseline` keeps, and how it refuses bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from precision_lab.cli import cli
from precision_lab.gate.baseline import (
    BASELINE_SCHEMA,
    RunKey,
    read_baseline,
    read_run_dir,
)
from precision_lab.run.summary import FIGURES
from tests.precision_lab.gate_runs import CONFIG, base_runs, find, write_run_dir


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_one_sentence_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_baseline_keeps_every_run_and_figure(tmp_path):
    runs = base_runs()
    run_dir = write_run_dir(tmp_path / "run", runs)
    out = tmp_path / "b.json"
    result = invoke("baseline", str(run_dir), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "5 runs" in result.output

    document = json.loads(out.read_text())
    assert document["schema"] == BASELINE_SCHEMA
    assert document["suite"] == "quick"
    assert document["environment"]["versions"] == CONFIG["versions"]
    assert document["environment"]["device"] == "cpu"
    assert document["environment"]["host"]["cpu_count"] >= 1
    assert len(document["runs"]) == len(runs)

    loaded = read_baseline(out)
    assert loaded.suite == "quick"
    for run in runs:
        # Every figure survives the round trip exactly; nothing is rounded.
        matches = [figures for figures in loaded.runs.values() if figures["run"] == run["run"]]
        assert len(matches) == 1
        for name in FIGURES:
            assert matches[0][name] == run[name], (run["run"], name)


def test_controls_are_kept_apart_from_float32_runs(tmp_path):
    runs = base_runs()
    # A float32 run of the suite with the same coordinates as r0's control.
    plain = {**find(runs, "r3"), "run": "r5", "control_of": None, "final_loss": 0.5}
    runs.append(plain)
    run_set = read_run_dir(write_run_dir(tmp_path / "run", runs))
    control = RunKey(
        "mlp", "baseline", "singd:diagonal", "float32", "pure", 0, "control of bfloat16/pure"
    )
    suite_run = RunKey("mlp", "baseline", "singd:diagonal", "float32", "pure", 0)
    assert run_set.runs[control]["run"] == "r3"
    assert run_set.runs[suite_run]["run"] == "r5"
    assert control.label.endswith("seed0 (control of bfloat16/pure)")


def test_non_finite_figures_are_written_as_null(tmp_path):
    run_dir = write_run_dir(tmp_path / "run", base_runs())
    out = tmp_path / "b.json"
    assert invoke("baseline", str(run_dir), "-o", str(out)).exit_code == 0
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    diverged = find([r["figures"] | {"run": r["run"]} for r in json.loads(text)["runs"]], "r1")
    assert diverged["final_loss"] is None and diverged["max_condition"] is None


def test_missing_run_dir_exits_2(tmp_path):
    result = invoke("baseline", str(tmp_path / "nowhere"), "-o", str(tmp_path / "b.json"))
    assert_one_sentence_error(result, "nowhere", "does not exist")
    assert not (tmp_path / "b.json").exists()


def test_corrupt_summary_exits_2(tmp_path):
    run_dir = write_run_dir(tmp_path / "run", base_runs())
    (run_dir / "summary.json").write_text('{"schema": 1, "runs": [', encoding="utf-8")
    result = invoke("baseline", str(run_dir), "-o", str(tmp_path / "b.json"))
    assert_one_sentence_error(result, "summary.json", "not valid JSON")


def test_summary_of_another_schema_exits_2(tmp_path):
    run_dir = write_run_dir(tmp_path / "run", base_runs())
    (run_dir / "summary.json").write_text('{"schema": 7, "runs": []}', encoding="utf-8")
    result = invoke("baseline", str(run_dir), "-o", str(tmp_path / "b.json"))
    assert_one_sentence_error(result, "schema 7", "schema 1")


def test_duplicate_run_keys_exit_2(tmp_path):
    runs = base_runs()
    runs.append({**find(runs, "r2"), "run": "r9"})
    run_dir = write_run_dir(tmp_path / "run", runs)
    result = invoke("baseline", str(run_dir), "-o", str(tmp_path / "b.json"))
    assert_one_sentence_error(result, "two runs with the same key", "cnn/baseline/singd:diagonal")


def test_run_without_key_fields_exits_2(tmp_path):
    runs = base_runs()
    del runs[0]["scenario"]
    run_dir = write_run_dir(tmp_path / "run", runs)
    result = invoke("baseline", str(run_dir), "-o", str(tmp_path / "b.json"))
    assert_one_sentence_error(result, "scenario")


def test_baseline_of_an_unfinished_suite_exits_2(tmp_path):
    runs = base_runs()
    find(runs, "r2")["finished"] = False
    run_dir = write_run_dir(tmp_path / "run", runs)
    result = invoke("baseline", str(run_dir), "-o", str(tmp_path / "b.json"))
    assert_one_sentence_error(result, "did not finish", "cnn/baseline")


def test_output_directory_must_exist(tmp_path):
    run_dir = write_run_dir(tmp_path / "run", base_runs())
    result = invoke("baseline", str(run_dir), "-o", str(tmp_path / "no" / "b.json"))
    assert_one_sentence_error(result, "does not exist")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", ["not valid JSON"]),
        ("[1, 2]", ["not a precision-lab baseline"]),
        ('{"format": "precision-lab-baseline", "schema": 99}', ["schema 99"]),
        ('{"format": "precision-lab-baseline", "schema": 1, "suite": "quick"}', ["corrupt"]),
        (
            '{"format": "precision-lab-baseline", "schema": 1, "suite": "quick",'
            ' "runs": [{"key": {"model": "mlp"}, "figures": {}}]}',
            ["corrupt"],
        ),
    ],
)
def test_corrupt_baselines_are_refused(tmp_path, text, words):
    path = tmp_path / "b.json"
    path.write_text(text, encoding="utf-8")
    run_dir = write_run_dir(tmp_path / "run", base_runs())
    result = invoke("gate", str(run_dir), "--baseline", str(path))
    assert_one_sentence_error(result, str(path), *words)


def tampered_baseline(tmp_path, edit) -> tuple:
    """A baseline of the reference runs after ``edit(document)``, and an identical run dir."""
    run_dir = write_run_dir(tmp_path / "run", base_runs())
    path = tmp_path / "b.json"
    assert invoke("baseline", str(run_dir), "-o", str(path)).exit_code == 0
    document = json.loads(path.read_text())
    edit(document)
    # json.dumps writes 1e400 (inf) as Infinity; a hand-edited file may say 1e400 itself.
    path.write_text(json.dumps(document).replace("Infinity", "1e400"), encoding="utf-8")
    return run_dir, path


def set_baseline_figure(name, value):
    def edit(document):
        document["runs"][0]["figures"][name] = value

    return edit


TAMPERED = [
    pytest.param(
        set_baseline_figure("optimizer_state_bytes", "abc"),
        "optimizer_state_bytes",
        id="bytes as text",
    ),
    pytest.param(
        set_baseline_figure("max_condition", [1, 2]), "max_condition", id="a list as condition"
    ),
    pytest.param(set_baseline_figure("final_loss", float("inf")), "final_loss", id="1e400 as loss"),
    pytest.param(set_baseline_figure("accuracy", 1.5), "accuracy", id="accuracy above 1"),
    pytest.param(set_baseline_figure("nan_events", -1), "nan_events", id="a negative count"),
    pytest.param(set_baseline_figure("diverged", "no"), "diverged", id="a flag as text"),
    pytest.param(
        set_baseline_figure("max_condition", 0.5), "max_condition", id="condition below 1"
    ),
    pytest.param(
        lambda document: document["runs"][0]["figures"].pop("inf_events"),
        "inf_events",
        id="a figure removed",
    ),
    pytest.param(
        lambda document: document["runs"][0]["key"].update(seed=[0]),
        "seed",
        id="seed as list",
    ),
    pytest.param(set_baseline_figure("seeds_broken", 1), "seeds_broken", id="seed count forged"),
]


@pytest.mark.parametrize(("edit", "field"), TAMPERED)
@pytest.mark.parametrize("mode", [[], ["--json"]], ids=["text", "json"])
def test_tampered_baselines_exit_2_naming_field_and_file(tmp_path, edit, field, mode):
    run_dir, path = tampered_baseline(tmp_path, edit)
    result = invoke("gate", str(run_dir), "--baseline", str(path), *mode)
    # The run by its key where the key is sound, else by its id.
    run = '"r0"' if field == "seed" else "mlp/baseline/singd:diagonal"
    assert_one_sentence_error(result, str(path), field, run)
    assert result.stdout == ""


@pytest.mark.parametrize("mode", [[], ["--json"]], ids=["text", "json"])
def test_a_check_that_cannot_compare_is_an_error_not_a_pass(tmp_path, mode):
    # A run that did not break, with no optimizer-state bytes in the baseline.
    run_dir, path = tampered_baseline(tmp_path, set_baseline_figure("optimizer_state_bytes", None))
    result = invoke("gate", str(run_dir), "--baseline", str(path), *mode)
    assert_one_sentence_error(
        result, "cannot compare", "optimizer_state_bytes", str(path), str(run_dir)
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", [0, 1]), ("seed", True), ("model", 3), ("run", ["r0"]), ("control_of", 5)],
)
def test_a_run_directory_with_bad_keys_exits_2(tmp_path, field, value):
    runs = base_runs()
    runs[0][field] = value
    run_dir = write_run_dir(tmp_path / "run", runs)
    result = invoke("baseline", str(run_dir), "-o", str(tmp_path / "b.json"))
    assert_one_sentence_error(result, "summary.json", field)


@pytest.mark.parametrize(
    ("field", "value"), [("optimizer_state_bytes", "abc"), ("underflow_fraction", 7)]
)
def test_a_run_directory_with_bad_figures_exits_2(tmp_path, field, value):
    runs = base_runs()
    runs[0][field] = value
    run_dir = write_run_dir(tmp_path / "run", runs)
    result = invoke("baseline", str(run_dir), "-o", str(tmp_path / "b.json"))
    assert_one_sentence_error(result, "summary.json", field, "'r0'")


def test_a_run_that_raised_is_kept_in_a_baseline(tmp_path):
    runs = base_runs()
    find(runs, "r2").update(finished=False, error="RuntimeError: boom", seeds_broken=1)
    run_dir = write_run_dir(tmp_path / "run", runs)
    out = tmp_path / "b.json"
    result = invoke("baseline", str(run_dir), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert invoke("gate", str(run_dir), "--baseline", str(out)).exit_code == 0
