"""Run directories under faults, on real processes and files: SIGKILL at random instants,
two writers at once, a directory already in use, a read-only place, a full disk, and
summaries edited by hand."""

import json
import random
import resource
import shutil
import signal
import subprocess
import time

import pytest
from click.testing import CliRunner

from precision_lab import load_run
from precision_lab.cli import cli
from precision_lab.errors import UsageError
from precision_lab.run.directory import RunDirectory, read_summary
from precision_lab.run.suite import parse_suite
from tests.precision_lab.stress_process import (
    finished_runs,
    start,
    temporary_files,
    tiny_suite,
    wait_until,
)


def assert_readable(out, report=False):
    """What a killed or failed suite must leave: load_run (and, with ``report``, the
    report command) reads it, and every run summary.json calls finished has its records."""
    summary, records = load_run(out)
    finished = set(summary.loc[summary["finished"], "run"])
    assert finished <= set(records["run"]), finished - set(records["run"])
    assert set(records["run"]) <= set(summary["run"])
    if report:
        page = out.parent / f"{out.name}-report.html"
        result = CliRunner().invoke(cli, ["report", str(out), "-o", str(page)])
        assert result.exit_code == 0, result.output
    return summary, records


def one_error_line(stderr):
    assert "Traceback" not in stderr, stderr[-3000:]
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("Error:")]
    return line


@pytest.mark.slow
def test_sigkill_at_random_instants_keeps_every_finished_run(tmp_path):
    """Three kills at random instants: after a random number of finished runs (0 to all
    six, then the records' merge and the report), plus a random delay of up to 0.3 s.
    Every finished run stays readable. Before records were kept per run,
    records.parquet had no footer and nothing was readable."""
    suite = tiny_suite(tmp_path)
    rng = random.Random(14)
    for i, runs in enumerate(rng.sample(range(7), 3)):
        out = tmp_path / f"run{i}"
        process = start(suite, out)
        wait_until(
            lambda o=out, n=runs: finished_runs(o) >= n and (o / "summary.json").exists(), process
        )
        time.sleep(rng.uniform(0.0, 0.3))
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
        summary, _ = assert_readable(out, report=i == 0)
        assert summary["finished"].sum() >= runs


@pytest.mark.slow
def test_two_writers_on_one_directory_one_runs_the_other_is_refused(tmp_path):
    """Two real processes started together on the same --out: one writes a complete run
    directory, the other exits 2 with one sentence, whichever comes second."""
    suite = tiny_suite(tmp_path, seeds=3)
    out = tmp_path / "run"
    first, second = start(suite, out), start(suite, out)
    results = [(p.wait(timeout=120), *p.communicate()) for p in (first, second)]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [(code, err[-2000:]) for code, _, err in results]
    (stderr,) = [err for code, _, err in results if code == 2]
    line = one_error_line(stderr)
    assert "another precision-lab process is writing it" in line or "already holds" in line
    summary, _ = assert_readable(out)
    assert summary["finished"].all() and (out / "report.html").is_file()
    assert not temporary_files(out)


def test_a_second_writer_in_the_same_process_is_refused_while_the_first_holds_it(tmp_path):
    plans = parse_suite(tiny_suite(tmp_path).read_text(), "t.toml").plan()
    first = RunDirectory(tmp_path / "run", {}, plans)
    with pytest.raises(UsageError, match="another precision-lab process is writing it"):
        RunDirectory(tmp_path / "run", {}, plans)
    first.close()
    with pytest.raises(UsageError, match="already holds a run"):
        RunDirectory(tmp_path / "run", {}, plans)


@pytest.mark.parametrize("entry", ["config.json", "records.parquet", "report.html", "notes"])
def test_out_refuses_any_non_empty_directory_and_leaves_it_alone(tmp_path, entry):
    out = tmp_path / "run"
    out.mkdir()
    (out / entry).write_text("keep me")
    result = CliRunner().invoke(cli, ["stress", "--suite", "quick", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "is not empty" in result.output and entry in result.output
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == [entry]
    assert (out / entry).read_text() == "keep me"


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory no one may write in: mode 0555, and for root (whom modes do not stop)
    the immutable attribute."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        (folder / "probe").touch()
    except OSError:
        yield folder
    else:
        pytest.skip("cannot make a read-only directory here")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr for root")
def test_read_only_out_is_one_sentence(read_only_dir):
    result = CliRunner().invoke(
        cli, ["stress", "--suite", "quick", "--out", str(read_only_dir / "run")]
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "Cannot create the run directory" in result.output
    result = CliRunner().invoke(cli, ["stress", "--suite", "quick", "--out", str(read_only_dir)])
    assert result.exit_code == 2 and "Cannot create the run directory" in result.output


def _file_size_limit(limit):
    def apply():
        # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG, as a full
        # disk fails with ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


FULL_DISK_SEEDS = 9
"""Runs of the full-disk suite: enough that its whole summary outgrows one run's records
file (about 12 kB with the what-if rows), which must still fit under the limit."""


def _summary_size_of_a_whole_run(tmp_path) -> int:
    """Bytes of summary.json after the tiny suite ran without a limit (about 120 B per
    finished run above the first summary, which lists every run planned)."""
    out = tmp_path / "unlimited"
    process = start(tiny_suite(tmp_path, seeds=FULL_DISK_SEEDS), out)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    return (out / "summary.json").stat().st_size


@pytest.mark.slow
@pytest.mark.parametrize("where", ["records or summary", "report"], ids=["mid-suite", "at-report"])
def test_a_full_disk_is_one_sentence_and_keeps_what_was_recorded(tmp_path, where):
    """No file may grow past a limit (RLIMIT_FSIZE). Mid-suite: 300 B below a whole run's
    summary, so the first summary (every run planned) fits and a later rewrite, a few runs
    on, does not (the limit follows the summary's size, which grows with its fields); at
    64 kB only the 5 MB report fails."""
    limit = _summary_size_of_a_whole_run(tmp_path) - 300 if where != "report" else 64 * 1024
    out = tmp_path / "run"
    suite = tiny_suite(tmp_path, seeds=FULL_DISK_SEEDS)
    process = start(suite, out, preexec_fn=_file_size_limit(limit))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr[-3000:]
    line = one_error_line(stderr)
    assert "Cannot write" in line and "File too large" in line, line
    assert not temporary_files(out)
    summary, _ = assert_readable(out)
    if where == "report":
        assert summary["finished"].all() and not (out / "report.html").exists()
    else:
        assert summary["finished"].any() and not summary["finished"].all()


def _write_summary(out, runs, **extra):
    out.mkdir(exist_ok=True)
    text = json.dumps({"schema": 1, "runs": runs, **extra})
    (out / "summary.json").write_text(text, encoding="utf-8")


GOOD = {"run": "r", "finished": True, "diverged": False, "steps": 3, "final_loss": 0.5}


@pytest.mark.parametrize(
    ("runs", "fragment"),
    [
        ([3], "run 1 is a int, but every run must be an object"),
        ([GOOD, "x"], "run 2 is a str"),
        ([{**GOOD, "run": 5}], "run 1 has run = 5"),
        ([{**GOOD, "steps": "3"}], "steps = '3', but steps must be a non-negative integer"),
        ([{**GOOD, "steps": True}], "steps = True"),
        ([{**GOOD, "nan_events": -1}], "nan_events = -1"),
        ([{**GOOD, "final_loss": "abc"}], "final_loss = 'abc', but final_loss must be a number"),
        ([{**GOOD, "max_condition": [1]}], "max_condition = [1]"),
        ([{**GOOD, "accuracy": 1.5}], "accuracy must be a number in [0, 1]"),
        ([{**GOOD, "finished": "yes"}], "finished must be true or false"),
        ([{**GOOD, "failure_cause": "cosmic"}], "failure_cause = 'cosmic'"),
    ],
)
def test_summary_figures_are_checked_on_read(tmp_path, runs, fragment):
    _write_summary(tmp_path, runs)
    with pytest.raises(UsageError, match="summary.json") as err:
        read_summary(tmp_path)
    assert fragment in str(err.value)
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 2 and fragment in result.output


def test_a_huge_loss_written_by_hand_is_refused(tmp_path):
    """1e400 reads back as an infinity: JSON written by the suite holds null instead."""
    (tmp_path / "summary.json").write_text(
        '{"schema": 1, "runs": [{"run": "r", "final_loss": 1e400}]}'
    )
    with pytest.raises(UsageError, match="final_loss = inf"):
        read_summary(tmp_path)


@pytest.mark.parametrize("records", [["../../etc/passwd"], "records.parquet", [3]])
def test_records_listed_outside_the_directory_are_refused(tmp_path, records):
    _write_summary(tmp_path, [GOOD], records=records)
    with pytest.raises(UsageError, match="records must list"):
        load_run(tmp_path)
