"""A DCGAN-style GAN: a generator of dense then transposed-convolution stages, and an
MLP or convolutional discriminator returning one logit. Every hidden layer is a
(layer, LeakyReLU(0.2)) pair inside an ``nn.Sequential``, the pattern
``imggen_fast.patch`` fuses."""

from __future__ import annotations

import torch
from torch import nn

from ._sizes import BASE_SIZE, check_positive, stride2_stages

SLOPE = 0.2
GENERATOR_DENSE_WIDTHS = (128, 128, 256, 256, 512, 512, 1024, 1024)
GENERATOR_BASE_CHANNELS = 512
DISCRIMINATOR_MLP_WIDTHS = (1024, 512, 256, 128, 64)
DISCRIMINATOR_CONV_FIRST_CHANNELS = 64


class Generator(nn.Module):
    """Noise (N, noise_dim) -> images (N, channels, image_size, image_size) in [-1, 1].

    noise → Linear+LeakyReLU(0.2) layers 128, 128, 256, 256, 512, 512, 1024, 1024 →
    Linear to 4·4·512 → reshape to (512, 4, 4) → ConvTranspose2d(512→512, k3, s1, p1)
    + LeakyReLU(0.2) → ConvTranspose2d(k4, s2, p1) + LeakyReLU(0.2) stages halving
    the channels (256, 128, 64 for 64 x 64) → a last k4 s2 p1 stage to ``channels``
    → tanh. Each stride-2 stage doubles the size, so there are log2(image_size/4)."""

    def __init__(self, image_size: int = 64, channels: int = 3, noise_dim: int = 100) -> None:
        super().__init__()
        stages = stride2_stages(image_size, "Generator")
        self.image_size = image_size
        self.channels = check_positive(channels, "channels", "Generator")
        self.noise_dim = check_positive(noise_dim, "noise_dim", "Generator")
        dense: list[nn.Module] = []
        width = noise_dim
        for out_width in GENERATOR_DENSE_WIDTHS:
            dense += [nn.Linear(width, out_width), nn.LeakyReLU(SLOPE)]
            width = out_width
        base = GENERATOR_BASE_CHANNELS
        dense += [nn.Linear(width, base * BASE_SIZE * BASE_SIZE), nn.Unflatten(1, (base, BASE_SIZE, BASE_SIZE))]
        self.dense = nn.Sequential(*dense)
        upsample: list[nn.Module] = [nn.ConvTranspose2d(base, base, 3, 1, 1), nn.LeakyReLU(SLOPE)]
        in_channels = base
        for stage in range(stages - 1):
            out_channels = base >> (stage + 1)
            upsample += [nn.ConvTranspose2d(in_channels, out_channels, 4, 2, 1), nn.LeakyReLU(SLOPE)]
            in_channels = out_channels
        upsample += [nn.ConvTranspose2d(in_channels, channels, 4, 2, 1), nn.Tanh()]
        self.upsample = nn.Sequential(*upsample)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.dense(noise))

    def sample_noise(self, batch_size: int, device: torch.device | str | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal noise (batch_size, noise_dim)."""
        return torch.randn(batch_size, self.noise_dim, device=device, generator=generator)


class Discriminator(nn.Module):
    """Images (N, channels, image_size, image_size) -> logits (N, 1) (no sigmoid).

    ``kind="mlp"``: Flatten → Linear+LeakyReLU(0.2) 1024, 512, 256, 128, 64 → Linear(1).
    ``kind="conv"``: Conv2d(k4, s2, p1)+LeakyReLU(0.2) stages 64, 128, 256, ... down to
    4 x 4 → Conv2d(k4) to one logit."""

    KINDS = ("mlp", "conv")

    def __init__(self, kind: str = "mlp", image_size: int = 64, channels: int = 3) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"Discriminator: kind must be 'mlp' or 'conv', got {kind!r}")
        stages = stride2_stages(image_size, "Discriminator")
        self.kind = kind
        self.image_size = image_size
        self.channels = check_positive(channels, "channels", "Discriminator")
        layers: list[nn.Module] = []
        if kind == "mlp":
            width = channels * image_size * image_size
            layers.append(nn.Flatten())
            for out_width in DISCRIMINATOR_MLP_WIDTHS:
                layers += [nn.Linear(width, out_width), nn.LeakyReLU(SLOPE)]
                width = out_width
            layers.append(nn.Linear(width, 1))
        else:
            in_channels = channels
            for stage in range(stages):
                out_channels = DISCRIMINATOR_CONV_FIRST_CHANNELS << stage
                layers += [nn.Conv2d(in_channels, out_channels, 4, 2, 1), nn.LeakyReLU(SLOPE)]
                in_channels = out_channels
            layers += [nn.Conv2d(in_channels, 1, BASE_SIZE), nn.Flatten()]
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)
