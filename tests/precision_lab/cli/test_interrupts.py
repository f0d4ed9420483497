"""SIGTERM and repeated Ctrl-C sent to a real ``precision-lab stress`` process."""

import signal
import time

import pytest
from click.testing import CliRunner

from precision_lab import load_run
from precision_lab.cli import cli
from tests.precision_lab.stress_process import finished_runs, start, tiny_suite, wait_until

STEPS = 300


def _stop_after_first_run(tmp_path, signals, gap=0.1):
    """Start the tiny suite (runs of STEPS steps), send ``signals`` ``gap`` seconds apart
    once its first run is recorded; return the run directory, exit code and stderr."""
    out = tmp_path / "run"
    process = start(tiny_suite(tmp_path, seeds=3, steps=STEPS), out)
    wait_until(lambda: finished_runs(out) >= 1, process)
    for sig in signals:
        process.send_signal(sig)
        time.sleep(gap)
    _, stderr = process.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr[-3000:]
    return out, process.returncode, stderr


@pytest.mark.slow
def test_sigterm_stops_the_suite_like_ctrl_c_and_exits_143(tmp_path):
    """A scheduler's SIGTERM: the run in progress stops and is recorded unfinished, the
    summary, the records and the report are written, exit 143 (before: killed by the
    signal, records.parquet unreadable)."""
    out, code, stderr = _stop_after_first_run(tmp_path, [signal.SIGTERM])
    assert code == 143, stderr[-3000:]
    assert "Interrupted: the runs recorded so far are saved." in stderr
    summary, records = load_run(out)
    assert summary["finished"].tolist()[:1] == [True] and not summary["finished"].all()
    assert summary["steps"].iloc[0] == STEPS and summary["steps"].iloc[-1] < STEPS
    assert summary["run"].iloc[0] in set(records["run"]) <= set(summary["run"].iloc[:2])
    assert (out / "report.html").stat().st_size > 0
    assert (out / "records.parquet").is_file() and not (out / "records").exists()


@pytest.mark.slow
@pytest.mark.parametrize("presses", [2, 3])
def test_repeated_ctrl_c_saves_the_records_skips_the_report_and_says_how_to_rebuild_it(
    tmp_path, presses
):
    """Ctrl-C pressed two or three times: the records are saved all the same, the report
    is skipped with the command that rebuilds it, and the process exits 130 rather than
    being killed by the signal (before: no report.html; three presses: exit -2)."""
    out, code, stderr = _stop_after_first_run(tmp_path, [signal.SIGINT] * presses)
    assert code == 130, stderr[-3000:]
    assert "Interrupted while saving" in stderr
    rebuild = f"precision-lab report {out}"
    assert rebuild in stderr
    assert not (out / "report.html").exists()
    summary, _ = load_run(out)
    assert summary["finished"].iloc[0] and not summary["finished"].all()
    result = CliRunner().invoke(cli, rebuild.split()[1:])
    assert result.exit_code == 0, result.output
    assert (out / "report.html").stat().st_size > 0
