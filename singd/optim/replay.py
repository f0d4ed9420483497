"""Replay saved inversion failures outside training.

    python -m singd.optim.replay FAILURE.pt [MORE.pt ...]

Each file is a reproducer that KFAC saved into its ``failure_dir`` (a stress run's
``RUN_DIR/failures/``; format in `singd.optim.inverses.save_reproducer`). For each, this
prints what failed (layer, factor, step, size, dtype, method, compute dtype, device and
torch version at the time) and the recorded reason, re-runs the same inversion on the
stored matrix with this machine's torch, and says whether it fails again.

Exit status: 1 if any failure recurs, 0 if all now succeed, 2 if a file cannot be read.
"""

from __future__ import annotations

import argparse
import sys

import torch

from singd.optim.inverses import replay


def main(argv: list[str] | None = None) -> int:
    """Replay each file; the exit status as in the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m singd.optim.replay", description="Replay failed KFAC inversions."
    )
    parser.add_argument("files", nargs="+", metavar="FILE.pt")
    args = parser.parse_args(argv)
    status = 0
    for path in args.files:
        try:
            record, error = replay(path)
        except (OSError, RuntimeError, KeyError, AttributeError) as err:
            print(f"cannot read reproducer {path}: {err}", file=sys.stderr)
            return 2
        size = "x".join(str(s) for s in record["matrix"].shape)
        print(
            f"{record['tag']}: {size} {record['dtype']} matrix, method {record['method']} "
            f"(computing in {record['inverse_dtype']}), saved on {record['device']} with "
            f"torch {record['torch_version']}; here torch {torch.__version__}"
        )
        print(f"  recorded failure: {record['reason']}")
        if error is None:
            print("  replay: the inversion now succeeds")
        else:
            print(f"  replay: fails again: {error.reason}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
