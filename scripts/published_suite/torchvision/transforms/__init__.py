"""``ToTensor``, ``Normalize`` and ``Compose`` on uint8 image tensors (H, W) or (C, H, W)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


class ToTensor:
    """uint8 (H, W) or (C, H, W) -> float32 (C, H, W) in [0, 1]."""

    def __call__(self, image: Tensor) -> Tensor:
        image = image if image.dim() == 3 else image.unsqueeze(0)
        return image.to(torch.float32).div_(255)


class Normalize:
    """``(x - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean.view(-1, 1, 1)) / self.std.view(-1, 1, 1)


class Compose:
    """The transforms applied in order."""

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Any) -> Any:
        for transform in self.transforms:
            x = transform(x)
        return x
