"""Two GANs, each a generator and a discriminator returning one logit.

``kind="seed"`` / ``"mlp"`` / ``"conv"``: this project's DCGAN-style models, a generator of
dense then transposed-convolution stages and an MLP or convolutional discriminator,
every hidden layer a (layer, LeakyReLU(0.2)) pair.

``kind="dcgan"``: the classic DCGAN of Radford et al. (2015), as in PyTorch's DCGAN
example: ConvTranspose2d(bias=False) -> BatchNorm2d -> ReLU blocks and Tanh;
Conv2d(bias=False) -> (BatchNorm2d) -> LeakyReLU(0.2) blocks; in-place activations,
the paper's initialisation.

All are plain ``torch.nn`` with their layers inside ``nn.Sequential``s, the pattern
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
DCGAN_WIDTH = 64  # the paper's ngf = ndf for 64 x 64 images
DCGAN_SLOPE = 0.2
DCGAN_INIT_STD = 0.02
GENERATOR_KINDS = ("seed", "dcgan")
DISCRIMINATOR_KINDS = ("mlp", "conv", "dcgan")


def _check_kind(kind: object, kinds: tuple[str, ...], owner: str) -> str:
    if kind not in kinds:
        raise ValueError(f"{owner}: kind must be one of {', '.join(map(repr, kinds))}, got {kind!r}")
    return kind


def _dcgan_width(kind: str, width: int | None, owner: str) -> int | None:
    """The DCGAN width (ngf / ndf): ``width`` or the paper's 64; None for the other kinds,
    which take no width."""
    if kind != "dcgan":
        if width is not None:
            raise ValueError(f"{owner}: width applies to kind='dcgan' only, got width={width!r} for kind={kind!r}")
        return None
    return DCGAN_WIDTH if width is None else check_positive(width, "width", owner)


def dcgan_init_(model: nn.Module) -> None:
    """The DCGAN initialisation (Radford et al., PyTorch's DCGAN example) in place:
    convolution weights from N(0, 0.02), batch norm weights from N(1, 0.02), biases 0."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(module.weight, 0.0, DCGAN_INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            nn.init.normal_(module.weight, 1.0, DCGAN_INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """Noise (N, noise_dim) -> images (N, channels, image_size, image_size) in [-1, 1].

    ``kind="seed"`` (the default): noise → Linear+LeakyReLU(0.2) layers 128, 128, 256,
    256, 512, 512, 1024, 1024 → Linear to 4·4·512 → reshape to (512, 4, 4) →
    ConvTranspose2d(512→512, k3, s1, p1) + LeakyReLU(0.2) → ConvTranspose2d(k4, s2, p1) +
    LeakyReLU(0.2) stages halving the channels (256, 128, 64 for 64 x 64) → a last k4 s2
    p1 stage to ``channels`` → tanh. Each stride-2 stage doubles the size, so there are
    log2(image_size/4).

    ``kind="dcgan"``: the classic DCGAN generator. Noise reshaped to (noise_dim, 1, 1) →
    ConvTranspose2d(k4, s1, p0, bias=False) to width·2^(stages-1) channels at 4 x 4 →
    BatchNorm2d → ReLU(inplace) → ConvTranspose2d(k4, s2, p1, bias=False) + BatchNorm2d +
    ReLU(inplace) blocks halving the channels down to ``width`` → ConvTranspose2d(k4, s2,
    p1, bias=False) to ``channels`` → Tanh. For 64 x 64 and the default width 64: 512 at
    4 x 4, 256, 128, 64, then the image, as in the paper. DCGAN initialisation. Its
    layers are all in ``upsample``; ``dense`` is empty."""

    def __init__(self, image_size: int = 64, channels: int = 3, noise_dim: int = 100, kind: str = "seed",
                 width: int | None = None) -> None:
        super().__init__()
        self.kind = _check_kind(kind, GENERATOR_KINDS, "Generator")
        width = _dcgan_width(kind, width, "Generator")
        stages = stride2_stages(image_size, "Generator")
        self.image_size = image_size
        self.channels = check_positive(channels, "channels", "Generator")
        self.noise_dim = check_positive(noise_dim, "noise_dim", "Generator")
        if kind == "dcgan":
            self.width = width
            self.dense = nn.Sequential()
            self.upsample = self._dcgan_blocks(stages, width)
            dcgan_init_(self)
            return
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

    def _dcgan_blocks(self, stages: int, width: int) -> nn.Sequential:
        channels = width << (stages - 1)
        blocks: list[nn.Module] = [nn.Unflatten(1, (self.noise_dim, 1, 1)),
                                   nn.ConvTranspose2d(self.noise_dim, channels, BASE_SIZE, 1, 0, bias=False),
                                   nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        for _ in range(stages - 1):
            blocks += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels // 2),
                       nn.ReLU(inplace=True)]
            channels //= 2
        blocks += [nn.ConvTranspose2d(channels, self.channels, 4, 2, 1, bias=False), nn.Tanh()]
        return nn.Sequential(*blocks)

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
    4 x 4 → Conv2d(k4) to one logit.
    ``kind="dcgan"``: the classic DCGAN discriminator. Conv2d(k4, s2, p1, bias=False) to
    ``width`` channels → LeakyReLU(0.2, inplace), then Conv2d(k4, s2, p1, bias=False) +
    BatchNorm2d + LeakyReLU(0.2, inplace) blocks doubling the channels down to 4 x 4 →
    Conv2d(k4, bias=False) to one logit. For 64 x 64 and the default width 64: 64, 128,
    256, 512 channels, as in the paper. DCGAN initialisation."""

    KINDS = DISCRIMINATOR_KINDS

    def __init__(self, kind: str = "mlp", image_size: int = 64, channels: int = 3, width: int | None = None) -> None:
        super().__init__()
        self.kind = _check_kind(kind, DISCRIMINATOR_KINDS, "Discriminator")
        width = _dcgan_width(kind, width, "Discriminator")
        stages = stride2_stages(image_size, "Discriminator")
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
        elif kind == "conv":
            in_channels = channels
            for stage in range(stages):
                out_channels = DISCRIMINATOR_CONV_FIRST_CHANNELS << stage
                layers += [nn.Conv2d(in_channels, out_channels, 4, 2, 1), nn.LeakyReLU(SLOPE)]
                in_channels = out_channels
            layers += [nn.Conv2d(in_channels, 1, BASE_SIZE), nn.Flatten()]
        else:
            self.width = width
            layers += [nn.Conv2d(channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(DCGAN_SLOPE, inplace=True)]
            for stage in range(1, stages):
                in_channels, out_channels = width << (stage - 1), width << stage
                layers += [nn.Conv2d(in_channels, out_channels, 4, 2, 1, bias=False), nn.BatchNorm2d(out_channels),
                           nn.LeakyReLU(DCGAN_SLOPE, inplace=True)]
            layers += [nn.Conv2d(width << (stages - 1), 1, BASE_SIZE, 1, 0, bias=False), nn.Flatten()]
        self.layers = nn.Sequential(*layers)
        if kind == "dcgan":
            dcgan_init_(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)
