"""Serve timed training steps of the published SINGD (PyPI singd 0.0.5) to the benchmark.

Run only with the reference venv's python, from outside the repository, as
`benchmarks/test_singd_step.py` does:

    cd /tmp && OMP_NUM_THREADS=1 /tmp/singd-ref-venv/bin/python \\
        /work/main/benchmarks/reference_step.py

It stays alive so that the benchmark can interleave single reference steps with its own
(so that both see the same machine load). Protocol: one JSON object per line on stdin,
one JSON reply per line on stdout.

- `{"structure": "dense"}`: build the MLP of `mlp_step.py` and the reference SINGD with
  that structure for K and C, take two warm-up steps; reply with the step's FLOP count
  (FlopCounterMode) and where `singd` was imported from.
- `{"steps": n}`: take n steps; reply `{"wall": [...], "cpu": [...], "faults": [...]}`,
  the wall-clock and CPU seconds and minor page faults of each step (`mlp_step.timed`).
- end of input: exit.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Our package is also called `singd`: only the venv's may be importable here.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
import mlp_step  # noqa: E402  (sys.path[0] is this script's folder, not the repository)

import singd  # noqa: E402
from singd.optim.optimizer import SINGD  # noqa: E402

if REPO in Path(singd.__file__).resolve().parents:
    sys.exit(f"`singd` resolves to this repository ({singd.__file__}); use the reference venv.")


def main() -> None:
    step = None
    for line in sys.stdin:
        request = json.loads(line)
        if "structure" in request:
            structure = request["structure"]
            model, x, y = mlp_step.build()
            with warnings.catch_warnings():
                # The reference warns on every Toeplitz step that it falls back to dense.
                warnings.simplefilter("ignore")
                optimizer = SINGD(model, structures=(structure, structure), **mlp_step.SINGD_KWARGS)
                step = mlp_step.make_step(model, optimizer, x, y)
                for _ in range(2):
                    step()
                flops = mlp_step.count_flops(step)
                step = mlp_step.timed(step)
            reply = {"flops": flops, "singd": singd.__file__, "torch": torch.__version__}
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wall, cpu, faults = zip(*(step() for _ in range(request["steps"])), strict=True)
            reply = {"wall": wall, "cpu": cpu, "faults": faults}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
