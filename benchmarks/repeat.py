"""Run the SINGD step benchmark in several processes, one after another, and judge the
median over them.

    OMP_NUM_THREADS=1 python benchmarks/repeat.py --processes 5 [pytest arguments]

Within one process a ratio's median over hundreds of steps is tight, but the same code
measured in ten processes gave SINGD-diagonal/AdamW ratios from 0.96 to 1.04: each
interpreter's memory and cache placement differs, so one process's ratio carries about
+-3% of noise its own steps cannot show. Each process here is a fresh interpreter running
`pytest benchmarks/test_singd_step.py` with the arguments given after the options (for
example `-k adamw`); it writes its figures to its own file (`SINGD_STEP_PROCESS_RESULT`),
and once all have run, `benchmarks/results/singd_step.{md,json}` gets per row the median
over processes, their range and the verdict on the median (`test_singd_step.write_summary`).
Never run two benchmarks at once: they would time each other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import test_singd_step
from results_table import RESULTS

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        usage="%(prog)s [--processes N] [pytest arguments, e.g. -k adamw]",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
    )
    parser.add_argument("--processes", type=int, default=5, help="how many, one at a time")
    options, pytest_args = parser.parse_known_args(argv)
    if options.processes < 1:
        parser.error(f"--processes must be at least 1, got {options.processes}")
    command = [sys.executable, "-m", "pytest", str(HERE / "test_singd_step.py"), *pytest_args]
    records, failures = [], 0
    with tempfile.TemporaryDirectory() as directory:
        for process in range(1, options.processes + 1):
            result = Path(directory) / f"process-{process}.json"
            env = os.environ | {test_singd_step.PROCESS_RESULT: str(result)}
            print(f"process {process} of {options.processes}: {' '.join(command)}", flush=True)
            failures += subprocess.run(command, env=env, cwd=HERE.parent).returncode != 0
            if result.exists():
                records.append(json.loads(result.read_text()))
    if not records:
        print("no process recorded figures (did the -k filter select a test?)", file=sys.stderr)
        return 1
    test_singd_step.write_summary(records)
    print((RESULTS / "singd_step.md").read_text())
    if failures:
        print(f"{failures} of {options.processes} processes failed", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
