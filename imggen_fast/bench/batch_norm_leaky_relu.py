"""Benchmark cases of ``batch_norm_leaky_relu``: BatchNorm2d in training followed by
LeakyReLU(0.2) (op ``batch_norm_leaky_relu``) or ReLU (op ``batch_norm_relu``), fp32, at
the classic DCGAN's sizes.

Providers, each at its best: ``eager`` (``F.batch_norm`` then the activation in place, as
``nn.Sequential(BatchNorm2d, LeakyReLU(inplace=True))`` runs), ``imggen_fast``
(:func:`imggen_fast.functional.batch_norm_leaky_relu`), ``compile`` (``torch.compile`` of
the same function with the activation out of place: inductor's code for the in-place
activation measured many times slower) and ``floor``: a multiply + sum of a
tensor of the same size, forward and backward (``(x * s).sum()``: one read pass forward,
one write pass backward), the order of what any provider must at least pay. Gradients are
taken with ``torch.autograd.grad`` for input, weight and bias.

``bytes_moved`` counts the passes over tensors of the input's size the op makes: forward
3 (read x for the statistics, read x and write y), backward 5 (read grad_y and y for the
sums, read them again and write grad_x); the per-channel vectors are negligible. The
floor's own bytes are given for it.

:func:`interleaved` times the providers of one case in turn (A, B, C, A, B, C, ...), which
is how the figures of a shared machine compare fairly; :func:`activation_bytes_of_models`
gives the bytes kept for backward by the classic DCGAN and the seed generator, eager and
patched."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import functional, models, patch
from .common import COMPILE, DIRECTIONS, EAGER, IMGGEN_FAST, Case, compiled, no_donated_buffers

FLOOR = "floor"
PROVIDERS = (EAGER, IMGGEN_FAST, COMPILE, FLOOR)
# Op name -> negative slope (0: ReLU).
OPS = {"batch_norm_leaky_relu": 0.2, "batch_norm_relu": 0.0}
SIZES = {"64x128x16x16": (64, 128, 16, 16), "64x512x4x4": (64, 512, 4, 4), "64x64x32x32": (64, 64, 32, 32)}
MOMENTUM = 0.1
EPS = 1e-5
_FLOAT32_BYTES = 4
# Passes over tensors of the input's size, per direction (see the module docstring).
_PASSES = {"forward": 3, "backward": 5, "both": 8}
_FLOOR_PASSES = {"forward": 2, "backward": 2, "both": 4}


def eager_batch_norm_activation(input: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                                weight: torch.Tensor, bias: torch.Tensor, negative_slope: float,
                                inplace: bool = True) -> torch.Tensor:
    """BatchNorm in training, then the activation (in place on its output by default, as
    eager users write it)."""
    normalized = F.batch_norm(input, running_mean, running_var, weight, bias, True, MOMENTUM, EPS)
    if negative_slope == 0:
        return F.relu(normalized, inplace=inplace)
    return F.leaky_relu(normalized, negative_slope, inplace=inplace)


def _inputs(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    channels = shape[1]
    return {"input": (torch.randn(shape, generator=generator) * 2 + 0.5).requires_grad_(),
            "running_mean": torch.zeros(channels), "running_var": torch.ones(channels),
            "weight": (torch.rand(channels, generator=generator) + 0.5).requires_grad_(),
            "bias": (torch.randn(channels, generator=generator) * 0.1).requires_grad_(),
            "grad_output": torch.randn(shape, generator=generator)}


def _forward(provider: str, tensors: dict[str, torch.Tensor], negative_slope: float) -> Callable[[], torch.Tensor]:
    arguments = [tensors[name] for name in ("input", "running_mean", "running_var", "weight", "bias")]
    if provider == EAGER:
        return lambda: eager_batch_norm_activation(*arguments, negative_slope)
    if provider == COMPILE:
        step = compiled(eager_batch_norm_activation)
        return lambda: step(*arguments, negative_slope, False)
    if provider == IMGGEN_FAST:
        return lambda: functional.batch_norm_leaky_relu(*arguments, True, MOMENTUM, EPS, negative_slope)
    if provider == FLOOR:
        scale = torch.randn_like(tensors["input"])
        return lambda: (tensors["input"] * scale).sum()
    raise ValueError(f"unknown provider {provider!r}")


def _maker(provider: str, shape: tuple[int, ...], negative_slope: float, direction: str):
    def make() -> Callable[[], object]:
        tensors = _inputs(shape)
        forward = _forward(provider, tensors, negative_slope)
        # The gradients are returned, not accumulated into .grad: in a network the input is
        # a convolution's output, whose gradient flows on instead of being added up.
        leaves = [tensors[name] for name in ("input", "weight", "bias")]

        def grad_output(output: torch.Tensor) -> torch.Tensor:
            return torch.ones_like(output) if output.dim() == 0 else tensors["grad_output"]

        if direction == "backward":
            with no_donated_buffers():
                output = forward()
            gradient = grad_output(output)

            def backward() -> None:
                with no_donated_buffers():
                    torch.autograd.grad(output, leaves, gradient, retain_graph=True, allow_unused=True)

            return backward
        forward()  # compiles (torch.compile) and builds the kernels before timing
        if direction == "forward":
            return forward

        def forward_and_backward() -> None:
            output = forward()
            torch.autograd.grad(output, leaves, grad_output(output), allow_unused=True)

        return forward_and_backward

    return make


def bytes_moved(shape: tuple[int, ...], direction: str, provider: str) -> int:
    passes = (_FLOOR_PASSES if provider == FLOOR else _PASSES)[direction]
    return passes * torch.Size(shape).numel() * _FLOAT32_BYTES


def cases() -> list[Case]:
    """Every (op, size, direction, provider) case."""
    return [
        Case(op, size, provider, direction, _maker(provider, shape, negative_slope, direction),
             bytes_moved=bytes_moved(shape, direction, provider))
        for op, negative_slope in OPS.items()
        for size, shape in SIZES.items()
        for direction in DIRECTIONS
        for provider in PROVIDERS
    ]


def interleaved(op: str, size: str, direction: str, rounds: int = 15,
                providers: tuple[str, ...] = PROVIDERS) -> dict[str, list[float]]:
    """Seconds of each provider's run of one case, the providers run in turn for ``rounds``
    rounds after one warm-up round: {provider: [seconds per round]}."""
    negative_slope, shape = OPS[op], SIZES[size]
    functions = {provider: _maker(provider, shape, negative_slope, direction)() for provider in providers}
    for function in functions.values():
        function()
    times: dict[str, list[float]] = {provider: [] for provider in providers}
    for _ in range(rounds):
        for provider, function in functions.items():
            start = time.perf_counter()
            function()
            times[provider].append(time.perf_counter() - start)
    return times


def summary(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median, minimum and the spread (upper quartile / lower quartile) of each provider's
    times, in milliseconds, and the ratio of each provider's median to imggen_fast's."""
    result = {}
    for provider, seconds in times.items():
        quartiles = statistics.quantiles(seconds, n=4)
        result[provider] = {"median_ms": statistics.median(seconds) * 1e3, "min_ms": min(seconds) * 1e3,
                            "spread": quartiles[2] / quartiles[0]}
    if IMGGEN_FAST in result:
        for provider in result:
            result[provider]["over_imggen_fast"] = result[provider]["median_ms"] / result[IMGGEN_FAST]["median_ms"]
    return result


def activation_bytes(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """Bytes autograd keeps for backward over one forward of ``model``: each storage
    counted once, the parameters' excluded (they exist anyway)."""
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(*inputs)
    return sum(storages.values())


def activation_bytes_of_models(batch: int = 64, image_size: int = 64) -> dict[str, dict[str, int]]:
    """{model: {"eager": bytes, "patched": bytes}} for the classic DCGAN generator and
    discriminator and the seed generator, fp32, in training mode."""
    torch.manual_seed(0)
    builds = {
        "dcgan_generator": (lambda: models.Generator(image_size=image_size, kind="dcgan"),
                            lambda: (torch.randn(batch, 100),)),
        "dcgan_discriminator": (lambda: models.Discriminator("dcgan", image_size=image_size),
                                lambda: (torch.randn(batch, 3, image_size, image_size),)),
        "seed_generator": (lambda: models.Generator(image_size=image_size), lambda: (torch.randn(batch, 100),)),
    }
    result = {}
    for name, (build, inputs) in builds.items():
        eager = build()
        arguments = inputs()
        result[name] = {"eager": activation_bytes(eager, arguments),
                        "patched": activation_bytes(patch(copy.deepcopy(eager)), arguments)}
    return result
