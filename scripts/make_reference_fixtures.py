"""Record parameter trajectories of the published SINGD (PyPI singd 0.0.5) as test fixtures.

Regenerate (about a minute on one core):

    scripts/reference_env.sh                      # once: /tmp/singd-ref-venv
    cd /tmp && OMP_NUM_THREADS=1 /tmp/singd-ref-venv/bin/python \\
        /work/main/scripts/make_reference_fixtures.py

It must run with the reference venv's python and from outside the repository: the
reference package is called `singd` like ours, and the script refuses to run if `singd`
resolves to this repository. It writes `tests/singd/fixtures/reference/`:

- `configs.json`: for every configuration its model spec, loss, optimizer arguments,
  number of steps, and measured facts (reference noise floor, update norm, ...);
- `<name>.pt`: plain tensors only (loads with `torch.load(weights_only=True)`):
  `initial` (parameters before training), `inputs`, `targets` (every batch), and
  `trajectory` (every parameter after every step).

`tests/singd/test_reference_equivalence.py` replays each configuration with our SINGD.
The models, losses and training loop live in `tests/singd/fixtures/reference_models.py`,
loaded here by file path so both sides run the same code without the repository on
`sys.path`.

Noise floor: every configuration is also run with the rows of every batch permuted. The
loss and the curvature are sums over rows, so the permuted run is the same computation
in exact arithmetic; the relative difference of its updates, recorded as
`reference_noise`, is the float32 rounding noise of the reference itself, the yardstick
for the tests' tolerance of 1e-5.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "singd" / "fixtures"
OUT = FIXTURES / "reference"
STEPS = 8

# The published package must come from the venv, never from this repository.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (REPO, REPO / "scripts")]
import singd  # noqa: E402
from singd.optim.optimizer import SINGD  # noqa: E402

if REPO in Path(singd.__file__).resolve().parents:
    sys.exit(f"`singd` resolves to this repository ({singd.__file__}); run the reference venv.")

_spec = importlib.util.spec_from_file_location("reference_models", FIXTURES / "reference_models.py")
models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(models)

# Two Linear layers whose every Kronecker factor has dimension > 30, so that
# hierarchical15_15 has its full [[A, B], [0, diag, 0], [0, D, E]] shape (K: 32, 33;
# C: 32, 31).
MLP = {
    "model": [
        ["linear", {"in_features": 31, "out_features": 32}],
        ["tanh", {}],
        ["linear", {"in_features": 32, "out_features": 31}],
    ],
    "input_shape": [8, 31],
    "input_scale": 3.0,
    "target_shape": [8],
    "classes": 31,
    "loss": "cross_entropy_mean",
}
# Every layer narrower than 30, so that block30diagonal is one dense block (REFERENCE gap 1).
NARROW_MLP = {
    "model": [
        ["linear", {"in_features": 17, "out_features": 21}],
        ["tanh", {}],
        ["linear", {"in_features": 21, "out_features": 7}],
    ],
    "input_shape": [12, 17],
    "input_scale": 3.0,
    "target_shape": [12],
    "classes": 7,
    "loss": "cross_entropy_mean",
}
# Conv2d with bias, stride and padding; then without bias, with dilation and groups.
# dim_K: 37, 27 (6/2 channels x 3 x 3, no bias), 33; dim_C: 6, 8, 5.
CNN = {
    "model": [
        [
            "conv2d",
            {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "stride": 2, "padding": 1},
        ],
        ["relu", {}],
        [
            "conv2d",
            {
                "in_channels": 6,
                "out_channels": 8,
                "kernel_size": 3,
                "padding": 1,
                "dilation": 2,
                "groups": 2,
                "bias": False,
            },
        ],
        ["flatten", {}],
        ["linear", {"in_features": 32, "out_features": 5}],
    ],
    "input_shape": [4, 4, 7, 7],
    "input_scale": 3.0,
    "target_shape": [4],
    "classes": 5,
    "loss": "cross_entropy_mean",
}
# Linear layers on (batch, sequence, features): weight sharing over the sequence.
SEQUENCE = {
    "model": [
        ["linear", {"in_features": 12, "out_features": 16}],
        ["relu", {}],
        ["linear", {"in_features": 16, "out_features": 7}],
    ],
    "input_shape": [6, 5, 12],
    "target_shape": [6, 5],
    "classes": 7,
    "loss": "cross_entropy_mean",
}
BASE_KWARGS = {
    "lr": 0.05,
    "momentum": 0.9,
    "damping": 1e-3,
    "alpha1": 0.5,
    "lr_cov": 0.05,
    "T": 1,
    "loss_average": "batch",
}


def config(name: str, base: dict[str, Any], note: str, **changes: Any) -> dict[str, Any]:
    """One configuration: `base` (a model family) with optimizer kwargs and overrides."""
    out = copy.deepcopy(base)
    out.update(name=name, note=note, steps=STEPS, kwargs=dict(BASE_KWARGS))
    for key, value in changes.items():
        if key in (
            "param_groups",
            "accumulate",
            "input_scale",
            "loss",
            "reference_bug",
            "seed",
            "grad_scaler",
            "nonfinite_step",
        ):
            out[key] = value
        else:
            out["kwargs"][key] = value
    return out


def same(structure: str) -> list[str]:
    return [structure, structure]


CONFIGS = [
    *(
        config(f"mlp_{s}", MLP, f"every factor {s}", structures=same(s))
        for s in ("dense", "diagonal", "hierarchical15_15", "triltoeplitz", "triutoeplitz")
    ),
    config(
        "mlp_mixed",
        MLP,
        "K hierarchical15_15, C triltoeplitz",
        structures=["hierarchical15_15", "triltoeplitz"],
    ),
    config(
        "mlp_ikfac_dense",
        MLP,
        "IKFAC; alpha1=0.5 given, the optimizer forces 0",
        structures=same("dense"),
        kfac_like=True,
    ),
    config(
        "mlp_ikfac_triutoeplitz",
        MLP,
        "IKFAC with Toeplitz factors",
        structures=same("triutoeplitz"),
        kfac_like=True,
        alpha1=0.0,
    ),
    config(
        "mlp_normalize_lr_cov",
        MLP,
        "normalize_lr_cov with large lr_cov and inputs x10 "
        "so that |m| exceeds 1 and the normalisation acts",
        structures=same("dense"),
        normalize_lr_cov=True,
        lr_cov=0.3,
        input_scale=10.0,
    ),
    config(
        "mlp_weight_decay",
        MLP,
        "weight decay",
        structures=same("hierarchical15_15"),
        weight_decay=0.1,
    ),
    config(
        "mlp_alpha1_zero",
        MLP,
        "no Riemannian momentum (no m buffers)",
        structures=same("triltoeplitz"),
        alpha1=0.0,
    ),
    config(
        "mlp_no_momentum",
        MLP,
        "momentum 0 (no parameter buffers)",
        structures=same("diagonal"),
        momentum=0.0,
    ),
    config(
        "mlp_T3", MLP, "preconditioner updated at steps 0, 3, 6 only", structures=same("dense"), T=3
    ),
    config(
        "mlp_accumulate",
        MLP,
        "two backward passes per step (gradient accumulation), T=2",
        structures=same("hierarchical15_15"),
        T=2,
        accumulate=2,
    ),
    config(
        "mlp_sum_loss",
        MLP,
        "summed loss, loss_average None",
        structures=same("dense"),
        loss="cross_entropy_sum",
        loss_average=None,
        lr=0.005,
    ),
    config(
        "mlp_lr_cov_schedule",
        MLP,
        "callable lr_cov: linear warm-up 0.01 -> 0.1 over 4 steps",
        structures=same("dense"),
        lr_cov={"warmup_from": 0.01, "to": 0.1, "steps": 4},
    ),
    config(
        "mlp_param_groups",
        MLP,
        "two groups: diagonal with lr 0.03, dense with lr_cov 0.02",
        structures=same("dense"),
        param_groups=[
            {"modules": ["0"], "structures": same("diagonal"), "lr": 0.03},
            {"modules": ["2"], "lr_cov": 0.02},
        ],
    ),
    config("cnn_expand_dense", CNN, "Conv2d, kfac_approx expand", structures=same("dense")),
    config(
        "cnn_reduce_dense",
        CNN,
        "Conv2d, kfac_approx reduce",
        structures=same("dense"),
        kfac_approx="reduce",
    ),
    config(
        "cnn_expand_hierarchical15_15",
        CNN,
        "Conv2d expand, hierarchical (small C)",
        structures=same("hierarchical15_15"),
    ),
    config(
        "cnn_reduce_triutoeplitz",
        CNN,
        "Conv2d reduce, Toeplitz",
        structures=same("triutoeplitz"),
        kfac_approx="reduce",
    ),
    config(
        "seq_expand_batch_sequence",
        SEQUENCE,
        "sequences, expand, mean over batch and sequence",
        structures=same("dense"),
        loss_average="batch+sequence",
    ),
    config(
        "seq_reduce_batch_sequence",
        SEQUENCE,
        "sequences, reduce, mean over batch and sequence",
        structures=same("dense"),
        loss_average="batch+sequence",
        kfac_approx="reduce",
    ),
    config(
        "seq_expand_sum",
        SEQUENCE,
        "sequences, expand, summed loss",
        structures=same("diagonal"),
        loss="cross_entropy_sum",
        loss_average=None,
        lr=0.01,
    ),
    config(
        "seq_preconditioner_dtype",
        SEQUENCE,
        "K and m_K in float64, C and m_C in float32 (the reference crashes with [float64, "
        "None]: it casts to the None dtype literally)",
        structures=same("dense"),
        loss_average="batch+sequence",
        preconditioner_dtype=["float64", "float32"],
    ),
    config(
        "seq_grad_scaler",
        SEQUENCE,
        "a real GradScaler: scale 1024 doubling every 2 steps, step 3 not finite (skipped, "
        "scale halved), init_grad_scale given",
        structures=same("dense"),
        loss_average="batch+sequence",
        init_grad_scale=1024.0,
        grad_scaler={"init_scale": 1024.0, "growth_interval": 2},
        nonfinite_step=3,
    ),
    config(
        "narrow_dense",
        NARROW_MLP,
        "layers < 30 wide, dense: what block30diagonal must equal",
        structures=same("dense"),
        seed=99,
    ),
    config(
        "narrow_block30diagonal",
        NARROW_MLP,
        "the reference's block30diagonal on the same "
        "run: it drifts from narrow_dense (REFERENCE gap 1)",
        structures=same("block30diagonal"),
        reference_bug=True,
        seed=99,
    ),
]


def run(cfg: dict[str, Any], initial: dict[str, torch.Tensor], inputs, targets):
    """Train the reference from `initial` on the batches; return trajectory and optimizer."""
    model = models.build_model(cfg["model"])
    model.load_state_dict(initial)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kfac_like's "setting alpha1 to zero"
        optimizer = SINGD(model, **models.optimizer_kwargs(cfg, model))
    loss = models.loss_function(cfg["loss"])
    trajectory = models.train(model, optimizer, loss, inputs, targets, cfg.get("grad_scaler"))
    return trajectory, optimizer


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    records = []
    for index, cfg in enumerate(CONFIGS):
        # The narrow pair shares a seed: same initial parameters, same batches.
        seed = cfg.get("seed", index)
        torch.manual_seed(1000 + seed)
        model = models.build_model(cfg["model"])
        initial = {name: p.detach().clone() for name, p in model.state_dict().items()}
        generator = torch.Generator().manual_seed(2000 + seed)
        inputs, targets = models.make_data(cfg, generator)

        trajectory, optimizer = run(cfg, initial, inputs, targets)
        permutation = torch.randperm(inputs.shape[2], generator=generator)
        permuted, _ = run(cfg, initial, inputs[:, :, permutation], targets[:, :, permutation])

        # How much the structure matters here: the same run with dense factors.
        dense_cfg = copy.deepcopy(cfg)
        dense_cfg["kwargs"]["structures"] = same("dense")
        for group in dense_cfg.get("param_groups", []):
            group.pop("structures", None)
        as_dense, _ = run(dense_cfg, initial, inputs, targets)

        update_norm = (
            sum(float((trajectory[n][-1] - initial[n]).square().sum()) for n in initial) ** 0.5
        )
        facts = {
            "reference_noise": models.relative_update_error(permuted, trajectory, initial),
            "update_norm": update_norm,
            "relative_difference_from_dense": models.relative_update_error(
                as_dense, trajectory, initial
            ),
            "final_max_abs_m": max(
                (
                    float(m.infinity_vector_norm())
                    for m in [*optimizer.m_Ks.values(), *optimizer.m_Cs.values()]
                ),
                default=None,
            ),
        }
        torch.save(
            {"initial": initial, "inputs": inputs, "targets": targets, "trajectory": trajectory},
            OUT / f"{cfg['name']}.pt",
        )
        records.append({**cfg, "facts": facts})
        print(
            f"{cfg['name']:32s} noise {facts['reference_noise']:.2e}  "
            f"vs dense {facts['relative_difference_from_dense']:.2e}  "
            f"|update| {update_norm:.3f}  max|m| {facts['final_max_abs_m']}"
        )

    blocks = {r["name"]: r for r in records}
    dense = torch.load(OUT / "narrow_dense.pt", weights_only=True)
    block = torch.load(OUT / "narrow_block30diagonal.pt", weights_only=True)
    blocks["narrow_block30diagonal"]["facts"]["relative_error_vs_narrow_dense"] = (
        models.relative_update_error(block["trajectory"], dense["trajectory"], dense["initial"])
    )
    document = {
        "generated_with": {
            "singd": importlib.metadata.version("singd"),
            "torch": torch.__version__,
            "dtype": "float32",
            "threads": 1,
        },
        "configs": records,
    }
    (OUT / "configs.json").write_text(json.dumps(document, indent=1) + "\n")
    print(
        "block30diagonal vs dense (reference, layers < 30):",
        blocks["narrow_block30diagonal"]["facts"]["relative_error_vs_narrow_dense"],
    )


if __name__ == "__main__":
    main()
