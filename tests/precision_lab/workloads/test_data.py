"""Digits and synthetic data: fixed splits, standardization, controlled conditioning."""

from collections import Counter

import torch

from precision_lab.workloads.data import digits, synthetic


def test_digits_split_and_standardization():
    data = digits()
    assert data.real and data.name == "digits"
    assert data.train_x.shape == (1437, 64) and data.test_x.shape == (360, 64)
    assert set(data.test_y.tolist()) == set(range(10))  # stratified: every class tested
    std = data.train_x.std(dim=0)
    varying = std > 0
    assert varying.sum() > 50  # only a few always-blank border pixels are constant
    torch.testing.assert_close(std[varying], torch.ones(int(varying.sum())), atol=1e-4, rtol=0)
    torch.testing.assert_close(data.train_x.mean(dim=0), torch.zeros(64), atol=1e-5, rtol=0)


def test_digits_split_is_fixed():
    digits.cache_clear()
    first = digits()
    digits.cache_clear()
    second = digits()
    assert torch.equal(first.train_x, second.train_x)
    assert torch.equal(first.test_y, second.test_y)


def test_synthetic_conditioning_spans_the_decades():
    data = synthetic(4.0)
    assert not data.real
    std = data.train_x.std(dim=0)
    # Feature scales go from 10**-2 to 10**2: four decades, sampling error of a few %.
    assert 0.9e4 < float(std[-1] / std[0]) < 1.1e4
    eigenvalues = torch.linalg.eigvalsh((data.train_x.T @ data.train_x).double() / 1440)
    assert 0.7e8 < float(eigenvalues[-1] / eigenvalues[0]) < 1.5e8


def test_synthetic_labels_come_from_the_whitened_features():
    data = synthetic(4.0)
    assert set(data.train_y.tolist()) == set(range(10))
    scales = 10.0 ** torch.linspace(-2, 2, 64)
    z = data.train_x / scales
    # A linear classifier on the whitened features fits the teacher's labels exactly.
    w = torch.linalg.lstsq(z, torch.nn.functional.one_hot(data.train_y).float()).solution
    agreement = ((z @ w).argmax(dim=1) == data.train_y).float().mean()
    assert agreement > 0.8


def test_batches_are_seeded_epochs():
    data = digits()
    first = [y for _, (_, y) in zip(range(22), data.batches(64, seed=3), strict=False)]
    again = [y for _, (_, y) in zip(range(22), data.batches(64, seed=3), strict=False)]
    other = [y for _, (_, y) in zip(range(22), data.batches(64, seed=4), strict=False)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    # 1437 // 64 = 22 batches per epoch, drawn without replacement: the epoch's rows are a
    # sub-multiset of the training rows.
    epoch = torch.cat([x for _, (x, _) in zip(range(22), data.batches(64, 3), strict=False)])
    assert epoch.shape == (22 * 64, 64)
    train_rows = Counter(row.numpy().tobytes() for row in data.train_x)
    epoch_rows = Counter(row.numpy().tobytes() for row in epoch)
    assert not epoch_rows - train_rows
