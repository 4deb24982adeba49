"""Benchmark cases of the fused layers: every LeakyReLU layer of the default Generator
(batch 64, 64 x 64 x 3 images) and of the conv Discriminator, plus the
ConvTranspose2d shape the issue's targets quote (64 x 256 x 16 x 16 -> 128 x 32 x 32).

Providers: ``eager`` (layer + ``nn.LeakyReLU``), ``eager_inplace`` (``LeakyReLU(inplace=True)``),
``imggen_fast`` (the fused layer), ``compile`` (torch.compile of eager) and ``bare`` (the
layer without activation: the floor)."""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import nn

from .. import nn as fused_nn
from .common import COMPILE, DIRECTIONS, EAGER, IMGGEN_FAST, Case, backward_only, compiled, saved_bytes

EAGER_INPLACE = "eager_inplace"
BARE = "bare"
PROVIDERS = (EAGER, EAGER_INPLACE, IMGGEN_FAST, COMPILE, BARE)
SLOPE = 0.2
BATCH = 64


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer: ``kind`` linear | conv2d | conv_transpose2d, its input shape and
    (out_channels, kernel, stride, padding)."""

    name: str
    kind: str
    input_shape: tuple[int, ...]
    out_channels: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0

    def module(self, fused: bool) -> nn.Module:
        in_channels = self.input_shape[1]
        extra = {"negative_slope": SLOPE} if fused else {}
        if self.kind == "linear":
            return (fused_nn.LinearLeakyReLU if fused else nn.Linear)(in_channels, self.out_channels, **extra)
        if self.kind == "conv2d":
            return (fused_nn.Conv2dLeakyReLU if fused else nn.Conv2d)(
                in_channels, self.out_channels, self.kernel, self.stride, self.padding, **extra)
        return (fused_nn.ConvTranspose2dLeakyReLU if fused else nn.ConvTranspose2d)(
            in_channels, self.out_channels, self.kernel, self.stride, self.padding, **extra)

    def output_pixels(self) -> int:
        if self.kind == "linear":
            return 1
        height = self.input_shape[2]
        if self.kind == "conv2d":
            side = (height + 2 * self.padding - self.kernel) // self.stride + 1
        else:
            side = (height - 1) * self.stride - 2 * self.padding + self.kernel
        return side * side

    def forward_flops(self) -> int:
        """Multiply-adds x 2 of the layer's forward (backward: twice that)."""
        batch, in_channels = self.input_shape[:2]
        if self.kind == "linear":
            return 2 * batch * in_channels * self.out_channels
        if self.kind == "conv2d":
            return 2 * batch * self.output_pixels() * self.out_channels * in_channels * self.kernel ** 2
        return 2 * batch * math.prod(self.input_shape[2:]) * in_channels * self.out_channels * self.kernel ** 2


def _generator_layers() -> list[Layer]:
    widths = [100, 128, 128, 256, 256, 512, 512, 1024, 1024]
    layers = [Layer(f"G.linear{index} {a}->{b}", "linear", (BATCH, a), b)
              for index, (a, b) in enumerate(zip(widths, widths[1:]), 1)]
    layers.append(Layer("G.convT k3 512x4x4->512x4x4", "conv_transpose2d", (BATCH, 512, 4, 4), 512, 3, 1, 1))
    channels, side = 512, 4
    for out_channels in (256, 128, 64):
        layers.append(Layer(f"G.convT k4s2 {channels}x{side}x{side}->{out_channels}x{2 * side}x{2 * side}",
                            "conv_transpose2d", (BATCH, channels, side, side), out_channels, 4, 2, 1))
        channels, side = out_channels, side * 2
    return layers


def _discriminator_layers() -> list[Layer]:
    layers, channels, side = [], 3, 64
    for out_channels in (64, 128, 256, 512):
        layers.append(Layer(f"D.conv k4s2 {channels}x{side}x{side}->{out_channels}x{side // 2}x{side // 2}",
                            "conv2d", (BATCH, channels, side, side), out_channels, 4, 2, 1))
        channels, side = out_channels, side // 2
    return layers


# The shape the issue's figures are quoted for.
ISSUE_LAYER = Layer("convT k4s2 256x16x16->128x32x32", "conv_transpose2d", (BATCH, 256, 16, 16), 128, 4, 2, 1)
LAYERS = _generator_layers() + _discriminator_layers() + [ISSUE_LAYER]


def build(layer: Layer, provider: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The provider's module (all with the same parameters) and an input that requires grad,
    as a hidden layer's input does in training."""
    torch.manual_seed(seed)
    bare = layer.module(fused=False)
    if provider == IMGGEN_FAST:
        module = layer.module(fused=True)
        module.load_state_dict(bare.state_dict())
    elif provider == BARE:
        module = bare
    else:
        module = nn.Sequential(bare, nn.LeakyReLU(SLOPE, inplace=provider == EAGER_INPLACE))
        if provider == COMPILE:
            module = compiled(module)
    x = torch.randn(layer.input_shape, requires_grad=True)
    return module, x


def _make(layer: Layer, provider: str, direction: str):
    module, x = build(layer, provider)
    if direction == "backward":
        return backward_only(lambda: module(x), lambda outputs: (torch.randn_like(outputs[0]),))
    grad = torch.randn_like(module(x))  # also compiles torch.compile's module
    if direction == "forward":
        return lambda: module(x)
    return lambda: module(x).backward(grad)


@functools.cache
def kept_for_backward(layer: Layer, provider: str) -> int:
    """Bytes of the distinct storages autograd keeps for backward over one forward."""
    module, x = build(layer, provider)
    return saved_bytes(lambda: module(x))


def cases(layers: list[Layer] | None = None, providers=PROVIDERS, directions=DIRECTIONS) -> list[Case]:
    flops_factor = {"forward": 1, "backward": 2, "both": 3}
    return [Case("layer_leaky_relu", layer.name, provider, direction,
                 functools.partial(_make, layer, provider, direction),
                 flops=layer.forward_flops() * flops_factor[direction])
            for layer in (layers or LAYERS) for direction in directions for provider in providers]


def generator_kept_for_backward(provider: str, image_size: int = 64, batch: int = BATCH) -> int:
    """Bytes autograd keeps for backward over one forward of the whole default Generator:
    ``eager`` as built, ``eager_inplace`` with in-place LeakyReLUs, ``imggen_fast`` patched."""
    from .. import models, patch

    torch.manual_seed(0)
    generator = models.Generator(image_size=image_size)
    if provider == EAGER_INPLACE:
        for module in generator.modules():
            if isinstance(module, nn.LeakyReLU):
                module.inplace = True
    elif provider == IMGGEN_FAST:
        patch(generator)
    noise = generator.sample_noise(batch)
    return saved_bytes(lambda: generator(noise))
