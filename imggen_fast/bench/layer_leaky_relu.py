"""Cases of the fused layers (``conv_transpose2d_leaky_relu``, ``conv2d_leaky_relu``,
``linear_leaky_relu``): the LeakyReLU layers of the default Generator (batch 64,
64 x 64 x 3 images) and of the conv Discriminator, plus the ConvTranspose2d shape the
project's first targets were quoted for (64 x 256 x 16 x 16 -> 128 x 32 x 32).

Providers: ``eager`` (layer + ``nn.LeakyReLU``), ``eager_channels_last`` (the same in
channels_last, convolutions only), ``eager_inplace`` (``LeakyReLU(inplace=True)``),
``imggen_fast`` (the fused layer) and ``imggen_fast_channels_last``, ``compile``
(torch.compile of eager) and ``floor_bare_layer`` (the layer without its activation:
the floor). ``flops`` counts the layer's multiply-adds x 2 (backward: twice the forward)."""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import nn

from .. import nn as fused_nn
from .common import (COMPILE, DIRECTIONS, EAGER, EAGER_CHANNELS_LAST, EAGER_INPLACE, FLOOR_BARE_LAYER, IMGGEN_FAST,
                     IMGGEN_FAST_CHANNELS_LAST, Case, compare, compiled, device, gradients, saved_bytes,
                     timed_direction)

OP = "layer_leaky_relu"
SLOPE = 0.2
BATCH = 64
PROVIDERS = (EAGER, EAGER_CHANNELS_LAST, EAGER_INPLACE, IMGGEN_FAST, IMGGEN_FAST_CHANNELS_LAST, COMPILE,
             FLOOR_BARE_LAYER)
CHANNELS_LAST_PROVIDERS = (EAGER_CHANNELS_LAST, IMGGEN_FAST_CHANNELS_LAST)
_FLOPS_FACTOR = {"forward": 1, "backward": 2, "both": 3}


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer: ``kind`` linear | conv2d | conv_transpose2d, its input shape and
    (out_channels, kernel, stride, padding). ``quick``: in the report's quick mode."""

    name: str
    kind: str
    input_shape: tuple[int, ...]
    out_channels: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    quick: bool = False

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

    def output_side(self) -> int:
        height = self.input_shape[2]
        if self.kind == "conv2d":
            return (height + 2 * self.padding - self.kernel) // self.stride + 1
        return (height - 1) * self.stride - 2 * self.padding + self.kernel

    def output_elements(self) -> int:
        if self.kind == "linear":
            return self.input_shape[0] * self.out_channels
        return self.input_shape[0] * self.out_channels * self.output_side() ** 2

    def forward_flops(self) -> int:
        """Multiply-adds x 2 of the layer's forward (its backward: twice that)."""
        batch, in_channels = self.input_shape[:2]
        if self.kind == "linear":
            return 2 * batch * in_channels * self.out_channels
        if self.kind == "conv2d":
            return 2 * batch * self.output_side() ** 2 * self.out_channels * in_channels * self.kernel ** 2
        return 2 * batch * math.prod(self.input_shape[2:]) * in_channels * self.out_channels * self.kernel ** 2


def _generator_layers() -> list[Layer]:
    layers = [Layer("G.linear 100->128", "linear", (BATCH, 100), 128, quick=True),
              Layer("G.linear 256->512", "linear", (BATCH, 256), 512),
              Layer("G.linear 1024->1024", "linear", (BATCH, 1024), 1024, quick=True),
              Layer("G.convT k3 512x4x4->512x4x4", "conv_transpose2d", (BATCH, 512, 4, 4), 512, 3, 1, 1)]
    channels, side = 512, 4
    for out_channels in (256, 128, 64):
        layers.append(Layer(f"G.convT k4s2 {channels}x{side}x{side}->{out_channels}x{2 * side}x{2 * side}",
                            "conv_transpose2d", (BATCH, channels, side, side), out_channels, 4, 2, 1,
                            quick=out_channels == 256))
        channels, side = out_channels, side * 2
    return layers


def _discriminator_layers() -> list[Layer]:
    layers, channels, side = [], 3, 64
    for out_channels in (64, 128, 256, 512):
        layers.append(Layer(f"D.conv k4s2 {channels}x{side}x{side}->{out_channels}x{side // 2}x{side // 2}",
                            "conv2d", (BATCH, channels, side, side), out_channels, 4, 2, 1, quick=channels == 3))
        channels, side = out_channels, side // 2
    return layers


# The shape the project's first targets were quoted for.
ISSUE_LAYER = Layer("convT k4s2 256x16x16->128x32x32", "conv_transpose2d", (BATCH, 256, 16, 16), 128, 4, 2, 1)
LAYERS = _generator_layers() + _discriminator_layers() + [ISSUE_LAYER]


def build(layer: Layer, provider: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The provider's module (all with the same parameters) and an input that requires
    grad, as a hidden layer's input does in training, on the benchmark device."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    bare = layer.module(fused=False)
    if provider in (IMGGEN_FAST, IMGGEN_FAST_CHANNELS_LAST):
        module = layer.module(fused=True)
        module.load_state_dict(bare.state_dict())
    elif provider == FLOOR_BARE_LAYER:
        module = bare
    else:
        module = nn.Sequential(bare, nn.LeakyReLU(SLOPE, inplace=provider == EAGER_INPLACE))
    module = module.to(device())
    x = torch.randn(layer.input_shape, generator=generator).to(device())
    if provider in CHANNELS_LAST_PROVIDERS:
        module = module.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if provider == COMPILE:
        module = compiled(module)
    return module, x.requires_grad_()


def _grad_output(layer: Layer, seed: int = 1) -> torch.Tensor:
    shape = (BATCH, layer.out_channels) if layer.kind == "linear" else (
        BATCH, layer.out_channels, layer.output_side(), layer.output_side())
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device())


def _make(layer: Layer, provider: str, direction: str):
    module, x = build(layer, provider)
    grad = _grad_output(layer)
    return timed_direction(lambda: module(x), direction, lambda outputs: (grad,))


def results(layer: Layer, provider: str) -> dict[str, torch.Tensor]:
    """The provider's output and gradients (input, weight, bias) for one seeded
    gradient of the output."""
    module, x = build(layer, provider)
    output = module(x)
    parameters = dict(module.named_parameters())
    inputs = {"input": x, "weight": next(value for name, value in parameters.items() if name.endswith("weight")),
              "bias": next(value for name, value in parameters.items() if name.endswith("bias"))}
    return {"output": output, **gradients((output,), inputs, (_grad_output(layer),))}


def check(layer: Layer, provider: str):
    """``provider``'s output and gradients against eager's (NCHW) on the same inputs."""
    return compare(results(layer, provider), results(layer, EAGER))


def kept_for_backward(layer: Layer, provider: str) -> int:
    """Bytes of the distinct storages autograd keeps for backward over one forward,
    parameters excluded."""
    module, x = build(layer, provider)
    return saved_bytes(lambda: module(x), exclude=module.parameters())


def cases(layers: list[Layer] | None = None, providers=PROVIDERS, directions=DIRECTIONS) -> list[Case]:
    """Every (layer, direction, provider) case; channels_last providers for convolutions only."""
    return [Case(OP, layer.name, provider, direction, functools.partial(_make, layer, provider, direction),
                 flops=layer.forward_flops() * _FLOPS_FACTOR[direction], elements=layer.output_elements(),
                 quick=layer.quick and direction == "both",
                 check=functools.partial(check, layer, provider) if provider.startswith(IMGGEN_FAST) else None,
                 kept_for_backward=functools.partial(kept_for_backward, layer, provider))
            for layer in (layers or LAYERS) for direction in directions for provider in providers
            if layer.kind != "linear" or provider not in CHANNELS_LAST_PROVIDERS]


CASES = cases()
