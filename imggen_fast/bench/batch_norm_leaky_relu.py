"""Cases of ``batch_norm_leaky_relu``: BatchNorm2d in training followed by LeakyReLU(0.2)
(op ``batch_norm_leaky_relu``) or ReLU (op ``batch_norm_relu``), fp32, at the classic
DCGAN's sizes (batch 64).

Providers, each at its best: ``eager`` (``F.batch_norm`` then the activation in place, as
``nn.Sequential(BatchNorm2d, LeakyReLU(inplace=True))`` runs), ``imggen_fast``
(:func:`imggen_fast.functional.batch_norm_leaky_relu`), ``compile`` (``torch.compile`` of
the same function with the activation out of place: inductor's code for the in-place
activation is many times slower, see the report) and ``floor_copy``: a copy of the
bytes the op must move.

``bytes_moved`` counts the passes over tensors of the input's size the op must make:
forward 3 (read x for the statistics, read x and write y), backward 5 (read grad_y and
what was saved for the sums, read them again and write grad_x); the per-channel vectors
are negligible.

Check: the output, the running statistics after the call and the gradients of input,
weight and bias against the eager reference (activation out of place) on the same inputs."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import functional
from .common import (COMPILE, DIRECTIONS, EAGER, FLOOR_COPY, IMGGEN_FAST, Case, compare, compiled, copy_floor,
                     device, gradients, saved_bytes, timed_direction)

PROVIDERS = (EAGER, IMGGEN_FAST, COMPILE, FLOOR_COPY)
# Op name -> negative slope (0: ReLU).
OPS = {"batch_norm_leaky_relu": 0.2, "batch_norm_relu": 0.0}
# Sizes from the smallest (batch x channels x height x width).
SIZES = {"64x512x4x4": (64, 512, 4, 4), "64x128x16x16": (64, 128, 16, 16), "64x64x32x32": (64, 64, 32, 32)}
QUICK_SIZE = "64x128x16x16"
MOMENTUM = 0.1
EPS = 1e-5
_FLOAT32_BYTES = 4
# Passes over tensors of the input's size, per direction (see the module docstring).
_PASSES = {"forward": 3, "backward": 5, "both": 8}
_PARAMETERS = ("input", "running_mean", "running_var", "weight", "bias")


def eager_batch_norm_activation(input: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                                weight: torch.Tensor, bias: torch.Tensor, negative_slope: float,
                                inplace: bool = True) -> torch.Tensor:
    """BatchNorm in training, then the activation (in place on its output by default, as
    eager users write it)."""
    normalized = F.batch_norm(input, running_mean, running_var, weight, bias, True, MOMENTUM, EPS)
    if negative_slope == 0:
        return F.relu(normalized, inplace=inplace)
    return F.leaky_relu(normalized, negative_slope, inplace=inplace)


def make_inputs(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Seeded input (requiring grad), fresh running statistics, weight and bias (requiring
    grad) and a gradient of the output, on the benchmark device."""
    generator = torch.Generator().manual_seed(0)
    channels = shape[1]
    tensors = {"input": torch.randn(shape, generator=generator) * 2 + 0.5,
               "running_mean": torch.zeros(channels), "running_var": torch.ones(channels),
               "weight": torch.rand(channels, generator=generator) + 0.5,
               "bias": torch.randn(channels, generator=generator) * 0.1,
               "grad_output": torch.randn(shape, generator=generator)}
    tensors = {name: tensor.to(device()) for name, tensor in tensors.items()}
    for name in ("input", "weight", "bias"):
        tensors[name].requires_grad_()
    return tensors


def _forward(provider: str, tensors: dict[str, torch.Tensor], negative_slope: float):
    arguments = [tensors[name] for name in _PARAMETERS]
    if provider == EAGER:
        return lambda: eager_batch_norm_activation(*arguments, negative_slope)
    if provider == COMPILE:
        step = compiled(eager_batch_norm_activation)
        return lambda: step(*arguments, negative_slope, False)
    if provider == IMGGEN_FAST:
        return lambda: functional.batch_norm_leaky_relu(*arguments, True, MOMENTUM, EPS, negative_slope)
    raise ValueError(f"unknown provider {provider!r}")


def _make(provider: str, shape: tuple[int, ...], negative_slope: float, direction: str):
    tensors = make_inputs(shape)
    return timed_direction(_forward(provider, tensors, negative_slope), direction,
                           lambda outputs: (tensors["grad_output"],))


def check(shape: tuple[int, ...], negative_slope: float, provider: str):
    """The output, the running statistics and the gradients of input, weight and bias
    against the eager reference on the same inputs."""
    results = {}
    for who in (provider, "reference"):
        tensors = make_inputs(shape)
        forward = (_forward(provider, tensors, negative_slope) if who == provider else
                   lambda: eager_batch_norm_activation(*[tensors[name] for name in _PARAMETERS], negative_slope,
                                                       inplace=False))
        output = forward()
        results[who] = {"output": output, "running_mean": tensors["running_mean"],
                        "running_var": tensors["running_var"],
                        **gradients((output,), {name: tensors[name] for name in ("input", "weight", "bias")},
                                    (tensors["grad_output"],))}
    return compare(results[provider], results["reference"])


def kept_for_backward(shape: tuple[int, ...], negative_slope: float, provider: str) -> int:
    tensors = make_inputs(shape)
    return saved_bytes(_forward(provider, tensors, negative_slope), exclude=(tensors["weight"], tensors["bias"]))


def bytes_moved(shape: tuple[int, ...], direction: str) -> int:
    return _PASSES[direction] * torch.Size(shape).numel() * _FLOAT32_BYTES


def _case(op: str, size: str, direction: str, provider: str) -> Case:
    shape, negative_slope = SIZES[size], OPS[op]
    moved = bytes_moved(shape, direction)
    common = {"bytes_moved": moved, "elements": torch.Size(shape).numel(),
              "quick": size == QUICK_SIZE and direction == "both"}
    if provider == FLOOR_COPY:
        return Case(op, size, provider, direction, copy_floor(moved), **common)
    return Case(op, size, provider, direction, functools.partial(_make, provider, shape, negative_slope, direction),
                check=(functools.partial(check, shape, negative_slope, provider)
                       if provider.startswith(IMGGEN_FAST) else None),
                kept_for_backward=functools.partial(kept_for_backward, shape, negative_slope, provider), **common)


def cases() -> list[Case]:
    """Every (op, size, direction, provider) case, sizes from the smallest."""
    return [_case(op, size, direction, provider)
            for op in OPS for size in SIZES for direction in DIRECTIONS for provider in PROVIDERS]


CASES = cases()
