"""The README's recipe: ``git bisect run`` with ``gate --bisect`` finds the first bad commit.

A throwaway repository stands for the project: each commit changes the run directory the
suite would write (its summary.json), so the judge script only gates it. One commit
leaves a run that cannot be judged (a corrupt summary): exit 125, which bisect skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from precision_lab.cli import cli
from tests.precision_lab.gate_runs import base_runs, find, write_run_dir

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org"}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        ["git", "-C", str(repo), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def commit(repo: Path, message: str, edit=None, text: str | None = None) -> str:
    """Commit the reference runs after ``edit`` (or ``text`` as summary.json)."""
    runs = base_runs()
    if edit is not None:
        edit(runs)
    write_run_dir(repo / "run", runs)
    if text is not None:
        (repo / "run" / "summary.json").write_text(text, encoding="utf-8")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD").strip()


@pytest.mark.slow
def test_git_bisect_run_finds_the_first_commit_the_gate_fails(tmp_path):
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    repo.mkdir()
    outside.mkdir()
    git(repo, "init", "-q")
    good = commit(repo, "good")
    # The baseline lives outside the repository, so that checkouts do not change it.
    baseline = outside / "baseline.json"
    made = subprocess.run(
        [sys.executable, "-m", "precision_lab", "baseline", str(repo / "run"), "-o", str(baseline)],
        cwd=outside,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    commit(repo, "loss within tolerance", lambda runs: find(runs, "r0").update(final_loss=0.43))
    commit(repo, "accuracy within tolerance", lambda runs: find(runs, "r2").update(accuracy=0.9))
    unjudged = commit(repo, "cannot be judged", text='{"schema": 1, "runs": [')
    commit(repo, "condition within 10x", lambda runs: find(runs, "r3").update(max_condition=1e4))
    first_bad = commit(
        repo, "10% more state", lambda runs: find(runs, "r0").update(optimizer_state_bytes=135_801)
    )
    commit(repo, "a new NaN", lambda runs: find(runs, "r2").update(nan_events=1))
    judge = outside / "judge.sh"
    judge.write_text(
        f'cd "{outside}" && exec "{sys.executable}" -m precision_lab gate "{repo / "run"}" '
        f'--baseline "{baseline}" --bisect\n',
        encoding="utf-8",
    )
    git(repo, "bisect", "start", "HEAD", good)
    output = git(repo, "bisect", "run", "sh", str(judge))
    assert f"{first_bad} is the first bad commit" in output, output
    # The commit whose run cannot be judged was tried and skipped (exit 125), not blamed.
    assert f"git bisect skip {unjudged}" in git(repo, "bisect", "log")
    git(repo, "bisect", "reset")


@pytest.mark.parametrize(
    ("case", "code", "plain"),
    [
        ("pass", 0, 0),
        ("regression", 1, 1),
        ("missing baseline", 125, 2),
        ("corrupt summary", 125, 2),
        ("bad option", 125, 2),
    ],
)
def test_bisect_exit_codes(tmp_path, case, code, plain):
    base = write_run_dir(tmp_path / "base", base_runs())
    baseline = tmp_path / "baseline.json"
    assert CliRunner().invoke(cli, ["baseline", str(base), "-o", str(baseline)]).exit_code == 0
    runs = base_runs()
    if case == "regression":
        find(runs, "r0")["optimizer_state_bytes"] += 1
    run_dir = write_run_dir(tmp_path / "now", runs)
    args = ["gate", str(run_dir), "--baseline", str(baseline)]
    if case == "missing baseline":
        args[-1] = str(tmp_path / "nowhere.json")
    if case == "corrupt summary":
        (run_dir / "summary.json").write_text("{", encoding="utf-8")
    if case == "bad option":
        args += ["--alpha", "2"]
    assert CliRunner().invoke(cli, args).exit_code == plain
    result = CliRunner().invoke(cli, [*args, "--bisect"])
    assert result.exit_code == code, result.output
    if code == 125:
        assert "Traceback" not in result.output
        assert len([line for line in result.stderr.splitlines() if line.strip()]) <= 3
