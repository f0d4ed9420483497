"""The digits models: an MLP, a small VGG-style CNN, a residual CNN and a small transformer.

All four read the same input, a batch of 8 x 8 single-channel images (the digits of
scikit-learn, or synthetic data of that shape) given as ``(batch, 64)`` float tensors,
and return 10 logits. Each is sized so that one training step takes milliseconds on one
CPU core in float32 and bfloat16, and stays affordable in float16, which this CPU
emulates at about 2 GFLOP/s.

The Kronecker-factored optimizers precondition the ``nn.Linear`` and ``nn.Conv2d``
layers; the residual CNN's BatchNorm layers and the transformer's LayerNorm, Embedding
and attention projections exercise the optimizers' fallback for unsupported layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

IMAGE_SIDE = 8
NUM_FEATURES = IMAGE_SIDE * IMAGE_SIDE
NUM_CLASSES = 10


class MLP(nn.Sequential):
    """64 -> 128 -> 64 -> 10 with ReLU: three Linear layers, K of size 65 / 129 / 65."""

    def __init__(self, hidden: tuple[int, ...] = (128, 64)) -> None:
        widths = (NUM_FEATURES, *hidden)
        layers: list[nn.Module] = []
        for d_in, d_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], NUM_CLASSES))
        super().__init__(*layers)


class VGG(nn.Module):
    """VGG-style: two 3x3 conv blocks with max pooling, then a Linear classifier.

    ``1 x 8 x 8 -> conv8 -> conv8 -> pool -> 8 x 4 x 4 -> conv16 -> pool -> 16 x 2 x 2 -> 10``.
    Convolutions keep the channel counts small: KFAC's input factor of a convolution is
    built from ``batch * 64`` unfolded patches, the costliest product in float16.
    """

    def __init__(self, channels: tuple[int, int] = (8, 16)) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(c2 * (IMAGE_SIDE // 4) ** 2, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE))
        return self.classifier(h.flatten(1))


class ResidualBlock(nn.Module):
    """``relu(x + BN(conv(relu(BN(conv(x))))))``: two 3x3 convolutions without bias (the
    BatchNorm's shift replaces it) around an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(x + self.norm2(self.conv2(h)))


class ResNet(nn.Module):
    """A residual CNN with batch normalization, ResNet-style, on the 8 x 8 images.

    ``1 x 8 x 8 -> conv c, BN, ReLU -> blocks residual blocks -> global average pool ->
    Linear -> 10``; in eval mode (the metric) BatchNorm uses its running statistics.
    """

    def __init__(self, channels: int = 16, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(*(ResidualBlock(channels) for _ in range(blocks)))
        self.head = nn.Linear(channels, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.stem(x.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)))
        return self.head(h.mean(dim=(2, 3)))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (ReLU, width 2 d)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        hidden = 2 * width
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A small transformer over the image's 8 rows as a sequence of 8 tokens of 8 features.

    Tokens are embedded by a Linear layer plus a learned position Embedding, pass
    ``depth`` pre-norm blocks, are mean-pooled and classified by a Linear head.
    """

    def __init__(self, width: int = 32, heads: int = 4, depth: int = 1) -> None:
        super().__init__()
        self.embed = nn.Linear(IMAGE_SIDE, width)
        self.position = nn.Embedding(IMAGE_SIDE, width)
        self.blocks = nn.Sequential(*(TransformerBlock(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
        positions = torch.arange(IMAGE_SIDE, device=x.device)
        h = self.blocks(self.embed(tokens) + self.position(positions))
        return self.head(self.norm(h.mean(dim=1)))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP,
    "cnn": VGG,
    "resnet": ResNet,
    "transformer": Transformer,
}


def build_model(name: str, seed: int) -> nn.Module:
    """Build model ``name`` in float32 with weights drawn from ``seed``.

    Raises:
        ValueError: For an unknown name, in one sentence listing the known ones.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; expected one of {', '.join(MODELS)}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name]()
