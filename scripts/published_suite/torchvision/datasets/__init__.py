"""``MNIST`` over the idx files at ``ROOT/MNIST/raw`` (the synthetic digits that
``scripts/run_published_tests.py`` writes there, in MNIST's own file format)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def read_idx(path: Path) -> Tensor:
    """An idx file (big-endian header: magic with the number of dimensions, sizes) as a
    uint8 tensor."""
    data = path.read_bytes()
    ndim = data[3]
    sizes = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    payload = bytearray(data[4 + 4 * ndim :])
    return torch.frombuffer(payload, dtype=torch.uint8).reshape(sizes)


class MNIST(torch.utils.data.Dataset):
    """The torchvision ``MNIST`` constructor and items, on files already on disk.

    Items are ``(transform(image), label)`` with the image a (28, 28) uint8 tensor (the
    stand-in ``ToTensor`` takes it where torchvision's takes a PIL image).
    """

    def __init__(
        self,
        root: str | Path,
        train: bool = True,
        transform: Callable[[Tensor], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        download: bool = False,
    ) -> None:
        """Load the train (60,000) or test (10,000) split; ``download`` fetches nothing.

        Raises:
            RuntimeError: If the files are not there.
        """
        raw = Path(root) / "MNIST" / "raw"
        prefix = "train" if train else "t10k"
        images, labels = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
        if not (images.exists() and labels.exists()):
            raise RuntimeError(f"Dataset not found at {raw} (this stand-in downloads nothing).")
        self.data, self.targets = read_idx(images), read_idx(labels).long()
        self.transform, self.target_transform = transform, target_transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, label = self.data[index], int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label
