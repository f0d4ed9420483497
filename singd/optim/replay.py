"""Replay saved inversion failures outside training.

    python -m singd.optim.replay FAILURE.pt [MORE.pt ...]

Each file is a reproducer that KFAC saved into its ``failure_dir`` (a stress run's
``RUN_DIR/failures/``; format in `singd.optim.inverses.save_reproducer`). For each, this
prints what failed (layer, factor, step, size, dtype, method, compute dtype, device and
torch version at the time) and the recorded reason, re-runs the same inversion on the
stored matrix with this machine's torch, and says whether it fails again.

Exit status: 1 if any failure recurs, 0 if all now succeed, 2 if a file cannot be read or
is not a reproducer (one sentence on stderr; the files before it are replayed).
"""

from __future__ import annotations

import argparse
import pickle
import sys

import torch

from singd.optim.inverses import INVERSE_METHODS, replay

FIELDS = ("matrix", "dtype", "method", "inverse_dtype", "device", "torch_version", "reason", "tag")
"""What `singd.optim.inverses.save_reproducer` writes: the matrix and seven strings."""


class ReproducerError(ValueError):
    """A file that is not a readable reproducer, in one sentence."""


def check_reproducer(path: str) -> None:
    """Load ``path`` as `replay` will and check that it is a reproducer KFAC saved.

    Raises:
        ReproducerError: The file cannot be read, is not a torch file of plain data, or
            is not a dict of `FIELDS` with a square floating matrix and a known method.
    """
    try:
        record = torch.load(path, weights_only=True)
    except OSError as err:
        raise ReproducerError(f"cannot read reproducer {path}: {err.strerror or err}.") from None
    except (EOFError, RuntimeError, pickle.UnpicklingError, ValueError) as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ReproducerError(f"{path} is not a reproducer saved by KFAC ({why}).") from None
    if not isinstance(record, dict):
        raise ReproducerError(
            f"{path} holds a {type(record).__name__}, not a reproducer saved by KFAC (a dict)."
        )
    for field in FIELDS:
        value = record.get(field)
        kind = torch.Tensor if field == "matrix" else str
        if not isinstance(value, kind):
            found = "nothing" if value is None else type(value).__name__
            raise ReproducerError(
                f"{path} is not a reproducer saved by KFAC: its {field!r} should be a "
                f"{kind.__name__}, found {found}."
            )
    matrix = record["matrix"]
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or not matrix.is_floating_point():
        raise ReproducerError(
            f"{path} holds a {tuple(matrix.shape)} {matrix.dtype} matrix; a reproducer's is "
            "square and floating point."
        )
    if record["method"] not in INVERSE_METHODS:
        raise ReproducerError(
            f"{path} names method {record['method']!r}; expected one of "
            f"{', '.join(INVERSE_METHODS)}."
        )
    try:
        torch.device(record["device"])
    except RuntimeError:
        raise ReproducerError(
            f"{path} names device {record['device']!r}, which is no torch device."
        ) from None
    if not isinstance(getattr(torch, record["inverse_dtype"], None), torch.dtype):
        raise ReproducerError(
            f"{path} names inverse_dtype {record['inverse_dtype']!r}, which is no torch dtype."
        )


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
            check_reproducer(path)
        except ReproducerError as err:
            print(f"Error: {err}", file=sys.stderr)
            return 2
        record, error = replay(path)
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
