"""The four inversion methods against float64 dense algebra, and their failure handling."""

import subprocess
import sys

import pytest
import torch

from singd.optim.inverses import (
    INVERSE_METHODS,
    InversionError,
    invert,
    invert_or_keep,
    newton_schulz,
    replay,
)
from singd.optim.replay import main

LAPACK_METHODS = ("cholesky", "eigh", "inv")
FP16_MAX = torch.finfo(torch.float16).max  # 65504
# Round-to-nearest sends float32 values >= 65520 (halfway to the next exponent step) to inf.
FP16_OVERFLOW = 65520.0


def spd(dim: int, condition: float, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """A random symmetric positive definite matrix with the given 2-norm condition number."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    eigenvalues = torch.logspace(0, -torch.log10(torch.tensor(condition)), dim, dtype=torch.float64)
    return ((q * eigenvalues) @ q.T).to(dtype)


@pytest.mark.parametrize("dim", [1, 7, 64])
@pytest.mark.parametrize("method", INVERSE_METHODS)
def test_every_method_matches_the_float64_inverse(method, dim):
    matrix = spd(dim, 1e3)
    expected = torch.linalg.inv(matrix)
    result = invert(matrix, method, inverse_dtype=torch.float64)
    assert result.dtype == torch.float64
    # Forward error of an inverse: about kappa * eps * small factor.
    tol = 1e3 * torch.finfo(torch.float64).eps * dim * expected.abs().max()
    assert (result - expected).abs().max() <= tol


@pytest.mark.parametrize("method", LAPACK_METHODS)
@pytest.mark.parametrize("factor_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_lapack_methods_compute_in_inverse_dtype_and_cast_once(method, factor_dtype):
    matrix = spd(12, 50.0, dtype=factor_dtype)
    result = invert(matrix, method, inverse_dtype=torch.float32)
    assert result.dtype == factor_dtype
    # The float32 inverse of the stored matrix, rounded once to the factor dtype.
    expected = torch.linalg.inv(matrix.double()).to(factor_dtype)
    ulp = torch.finfo(factor_dtype).eps
    scale = expected.abs().max().double()
    err = (result.double() - expected.double()).abs().max()
    assert err <= 2 * ulp * scale + 50.0 * 1e-6 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [5, 40])
def test_newton_schulz_is_accurate_to_its_dtype(dtype, dim):
    # Stopping at the Frobenius residual's rounding floor leaves a relative error of about
    # kappa * eps * sqrt(d); kappa = 4 keeps that bound well below 1 even for bfloat16.
    condition = 4.0
    matrix = spd(dim, condition, dtype=dtype, seed=dim)
    result = newton_schulz(matrix)
    assert result.dtype == dtype
    expected = torch.linalg.inv(matrix.double())
    rel = (result.double() - expected).abs().max() / expected.abs().max()
    assert rel <= condition * torch.finfo(dtype).eps * dim**0.5


def test_newton_schulz_warm_start_from_a_nearby_inverse_and_ignores_a_bad_one():
    matrix = spd(30, 100.0)
    expected = torch.linalg.inv(matrix)
    nearby = torch.linalg.inv(matrix + 1e-3 * torch.eye(30, dtype=torch.float64))
    for initial in (nearby, 1e6 * torch.eye(30, dtype=torch.float64), torch.zeros(3, 3)):
        result = newton_schulz(matrix, initial=initial)
        assert torch.allclose(result, expected, rtol=0, atol=1e-9 * expected.abs().max())


@pytest.mark.parametrize("method", LAPACK_METHODS)
def test_fp16_inverse_overflows_exactly_at_the_float16_limit(method):
    # Subnormal float16 diagonal entries k * 2^-24: 1/(256 * 2^-24) = 65536 rounds to inf,
    # 1/(257 * 2^-24) = 65281.0... stays finite (below 65504).
    tiny = 2.0**-24
    entries = torch.tensor([256 * tiny, 257 * tiny, 1.0], dtype=torch.float16)
    assert entries[0].item() == 256 * tiny and entries[1].item() == 257 * tiny
    result = invert(torch.diag(entries), method, inverse_dtype=torch.float32)
    assert result[0, 0].item() == float("inf")
    assert result[1, 1].item() == pytest.approx(65280.0, abs=32.0)
    assert torch.isfinite(result[1:, 1:]).all()


@pytest.mark.parametrize("method", LAPACK_METHODS)
def test_fp16_overflow_pattern_of_a_dense_inverse_follows_float64_arithmetic(method):
    # A dense SPD float16 matrix (eigenvalues 3.3e-6 .. 3.3e-4) whose inverse has entries
    # on both sides of the limit; "exact" is the float64 inverse of the stored matrix.
    matrix = (spd(8, 100.0, seed=3) * 3.3e-4).to(torch.float16)
    exact = torch.linalg.inv(matrix.double())
    assert (exact.abs() > 1.01 * FP16_OVERFLOW).any() and (exact.abs() < 0.99 * FP16_MAX).any()
    result = invert(matrix, method, inverse_dtype=torch.float64)
    clear_above = exact.abs() > 1.01 * FP16_OVERFLOW
    clear_below = exact.abs() < 0.99 * FP16_MAX
    assert torch.isinf(result[clear_above]).all()
    assert torch.isfinite(result[clear_below]).all()


@pytest.mark.parametrize("method", INVERSE_METHODS)
def test_non_finite_input_fails_for_every_method(method):
    matrix = spd(4, 2.0, dtype=torch.float16)
    matrix[1, 2] = float("nan")
    with pytest.raises(InversionError, match="non-finite") as info:
        invert(matrix, method)
    # The compute dtype on record: Newton-Schulz works in the matrix's own dtype.
    expected = torch.float16 if method == "newton-schulz" else torch.float32
    assert info.value.inverse_dtype == expected


@pytest.mark.parametrize(
    ("method", "matrix", "reason"),
    [
        ("cholesky", torch.diag(torch.tensor([1.0, -1.0, 2.0])), "not positive definite"),
        ("eigh", torch.diag(torch.tensor([1.0, -1.0, 2.0])), "not positive definite"),
        ("inv", torch.zeros(3, 3), "singular"),
        (
            "newton-schulz",
            spd(6, 1e6, dtype=torch.float16).float().to(torch.float16),
            "did not converge",
        ),
    ],
)
def test_each_method_reports_its_failure(method, matrix, reason):
    with pytest.raises(InversionError, match=reason):
        invert(matrix, method)


def test_invalid_method_and_dtype_are_one_sentence_errors():
    with pytest.raises(ValueError, match=r"inverse_method must be one of .* got 'lu'"):
        invert(torch.eye(2), "lu")
    with pytest.raises(ValueError, match=r"inverse_dtype must be .* got torch.float16"):
        invert(torch.eye(2), "cholesky", inverse_dtype=torch.float16)


def test_failure_keeps_the_previous_inverse_or_the_identity(tmp_path):
    bad = torch.diag(torch.tensor([1.0, -1.0, 2.0]))
    inverse, error = invert_or_keep(bad, None, "cholesky", failure_dir=tmp_path, tag="fc1.A")
    assert isinstance(error, InversionError)
    assert torch.equal(inverse, torch.eye(3))
    previous = torch.diag(torch.tensor([1.0, 0.5, 0.25]))
    inverse, error = invert_or_keep(bad, previous, "eigh", failure_dir=tmp_path, tag="fc1.A")
    assert error is not None and inverse is previous
    good = torch.diag(torch.tensor([1.0, 2.0, 4.0]))
    inverse, error = invert_or_keep(good, previous, "cholesky")
    assert error is None and torch.allclose(inverse, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fc1.A.cholesky.pt", "fc1.A.eigh.pt"]


def test_on_failure_raise_raises_after_saving_the_reproducer(tmp_path):
    bad = torch.diag(torch.tensor([1.0, -1.0]))
    with pytest.raises(InversionError, match="not positive definite"):
        invert_or_keep(bad, None, "cholesky", on_failure="raise", failure_dir=tmp_path, tag="x")
    assert (tmp_path / "x.cholesky.pt").exists()


def test_reproducer_loads_with_weights_only_and_replays(tmp_path, capsys):
    bad = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=torch.float16))
    invert_or_keep(bad, None, "cholesky", failure_dir=tmp_path, tag="net.0/G step 3")
    (path,) = tmp_path.iterdir()
    assert path.name == "net.0_G_step_3.cholesky.pt"
    record = torch.load(path, weights_only=True)
    assert torch.equal(record["matrix"], bad)
    assert record["dtype"] == "float16" and record["method"] == "cholesky"
    assert record["inverse_dtype"] == "float32" and record["device"] == "cpu"
    assert record["torch_version"] == torch.__version__
    _, error = replay(path)
    assert error is not None and "not positive definite" in error.reason
    assert main([str(path)]) == 1
    assert "fails again: not positive definite" in capsys.readouterr().out
    # The same file, repaired, replays as a success.
    record["matrix"] = bad.abs()
    torch.save(record, path)
    assert main([str(path)]) == 0


def _replay_in_a_process(path) -> subprocess.CompletedProcess:
    """``python -m singd.optim.replay PATH`` in a real interpreter, as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", "singd.optim.replay", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_replay_one_liner_runs_outside_training(tmp_path):
    invert_or_keep(torch.zeros(2, 2), None, "inv", failure_dir=tmp_path, tag="layer")
    done = _replay_in_a_process(tmp_path / "layer.inv.pt")
    assert done.returncode == 1, done.stderr
    assert "fails again: singular" in done.stdout
    assert done.stderr == ""  # no runpy warning, no traceback


def test_replay_of_a_missing_file_is_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope.pt")]) == 2
    assert "cannot read reproducer" in capsys.readouterr().err


def _reproducer(tmp_path, **changes):
    """A real reproducer file (a failed Cholesky), with ``changes`` made to its record."""
    invert_or_keep(torch.diag(torch.tensor([1.0, -1.0])), None, "cholesky", failure_dir=tmp_path)
    (path,) = tmp_path.glob("*.pt")
    record = torch.load(path, weights_only=True)
    record.update(changes)
    torch.save({k: v for k, v in record.items() if v is not None}, path)
    return path


def _saved(folder, obj):
    path = folder / "case.pt"
    if isinstance(obj, bytes):
        path.write_bytes(obj)
    else:
        torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: _saved(d, b""), "is not a reproducer saved by KFAC"),
        (lambda d: _saved(d, b"not a torch file"), "is not a reproducer saved by KFAC"),
        (lambda d: _saved(d, [1, 2]), "holds a list, not a reproducer"),
        (lambda d: _saved(d, {"matrix": torch.eye(2)}), "its 'dtype' should be a str"),
        (lambda d: _reproducer(d, tag=None), "its 'tag' should be a str, found nothing"),
        (lambda d: _reproducer(d, method="lu"), "names method 'lu'; expected one of"),
        (lambda d: _reproducer(d, method=3), "its 'method' should be a str, found int"),
        (lambda d: _reproducer(d, inverse_dtype="nope"), "no torch dtype"),
        (lambda d: _reproducer(d, device="floppy"), "no torch device"),
        (lambda d: _reproducer(d, matrix=torch.ones(2, 3)), "is square"),
    ],
)
def test_replay_of_what_is_not_a_reproducer_is_one_sentence_and_exit_2(
    tmp_path, capsys, make, fragment
):
    assert main([str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and fragment in err, err


def test_replay_of_an_empty_file_in_a_real_process_is_exit_2(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    done = _replay_in_a_process(tmp_path / "empty.pt")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("Error: ") and "Traceback" not in done.stderr
