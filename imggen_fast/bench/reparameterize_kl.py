"""Cases of ``reparameterize_kl``: the VAE bottleneck, fp32, noise included.

Providers: ``eager`` (the reference with ``torch.randn_like`` noise), ``imggen_fast``
(the fused op making its noise in the kernel), ``compile`` (``torch.compile`` of the
eager function), ``imggen_fast_eps`` (the fused op with ``eps`` given, so that it only
streams memory: other work than the others', left out of the speed-ups) and
``floor_copy`` (a copy of the bytes the op must move). Sizes (batch x latent): from the
overhead-bound 128x32 to the bandwidth-bound 256x65536 (16.8M elements).

``bytes_moved`` is what the op must read and write, the same for every provider of a
case: forward reads mu and logvar and writes z; backward reads grad_z, mu and logvar and
writes grad_mu and grad_logvar; the KL scalars are negligible. (The eps-given variant
also reads eps each way: its GB/s counts the bytes it moves.)

Check: imggen_fast's noise is its own (Philox, not torch's generator), so the check
recovers it from z, ``eps = (z - mu) / exp(logvar / 2)``, and compares z, kl and both
gradients with the reference computed with that eps: the gradient of logvar holds the
noise the backward regenerated, so a backward that regenerated other noise fails."""

from __future__ import annotations

import functools

import torch

from .. import functional, reference
from .common import (COMPILE, DIRECTIONS, EAGER, FLOOR_COPY, IMGGEN_FAST, Case, compare, compiled, copy_floor,
                     device, gradients, saved_bytes, timed_direction)

OP = "reparameterize_kl"
IMGGEN_FAST_EPS = "imggen_fast_eps"
PROVIDERS = (EAGER, IMGGEN_FAST, IMGGEN_FAST_EPS, COMPILE, FLOOR_COPY)
SIZES = {"128x32": (128, 32), "128x128": (128, 128), "256x4096": (256, 4096), "256x65536": (256, 65536)}
QUICK_SIZES = ("128x32", "256x4096")
_FLOAT32_BYTES = 4
# Tensors of the size of mu each direction reads and writes, without and with eps.
_STREAMS = {"forward": (3, 4), "backward": (5, 6), "both": (8, 10)}


def eager_reparameterize_kl(mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager VAE bottleneck as users write it: noise from torch.randn_like."""
    return reference.reparameterize_kl(mu, logvar, torch.randn_like(mu))


def make_inputs(shape: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mu and logvar (requiring grad) and a noise tensor, seeded, on the benchmark device."""
    generator = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=generator)
    logvar = torch.randn(shape, generator=generator) * 0.5
    eps = torch.randn(shape, generator=generator)
    return mu.to(device()).requires_grad_(), logvar.to(device()).requires_grad_(), eps.to(device())


def _forward(provider: str, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor):
    if provider == EAGER:
        return lambda: eager_reparameterize_kl(mu, logvar)
    if provider == COMPILE:
        step = compiled(eager_reparameterize_kl)
        return lambda: step(mu, logvar)
    if provider == IMGGEN_FAST:
        return lambda: functional.reparameterize_kl(mu, logvar)
    if provider == IMGGEN_FAST_EPS:
        return lambda: functional.reparameterize_kl(mu, logvar, eps)
    raise ValueError(f"unknown provider {provider!r}")


def _make(provider: str, shape: tuple[int, int], direction: str):
    mu, logvar, eps = make_inputs(shape)
    return timed_direction(_forward(provider, mu, logvar, eps), direction)


def check(shape: tuple[int, int], provider: str):
    """z, kl and the gradients of mu and logvar against the reference with the same noise
    (recovered from z for ``imggen_fast``, given for ``imggen_fast_eps``)."""
    mu, logvar, eps = make_inputs(shape)
    seeds = torch.Generator().manual_seed(1)
    grad_z = torch.randn(shape, generator=seeds).to(device())
    grad_kl = torch.tensor(0.75, device=device())
    z, kl = _forward(provider, mu, logvar, eps)()
    if provider == IMGGEN_FAST:
        eps = ((z.double() - mu.double()) / torch.exp(0.5 * logvar.double())).float().detach()
    actual = {"z": z, "kl": kl, **gradients((z, kl), {"mu": mu, "logvar": logvar}, (grad_z, grad_kl))}
    expected_z, expected_kl = reference.reparameterize_kl(mu, logvar, eps)
    expected = {"z": expected_z, "kl": expected_kl,
                **gradients((expected_z, expected_kl), {"mu": mu, "logvar": logvar}, (grad_z, grad_kl))}
    return compare(actual, expected)


def kept_for_backward(shape: tuple[int, int], provider: str) -> int:
    mu, logvar, eps = make_inputs(shape)
    return saved_bytes(_forward(provider, mu, logvar, eps))


def bytes_moved(shape: tuple[int, int], direction: str, with_eps: bool = False) -> int:
    return _STREAMS[direction][with_eps] * shape[0] * shape[1] * _FLOAT32_BYTES


def _case(size: str, direction: str, provider: str) -> Case:
    shape = SIZES[size]
    quick = size in QUICK_SIZES and direction == "both"
    if provider == FLOOR_COPY:
        return Case(OP, size, provider, direction, copy_floor(bytes_moved(shape, direction)),
                    bytes_moved=bytes_moved(shape, direction), elements=shape[0] * shape[1], quick=quick)
    return Case(OP, size, provider, direction, functools.partial(_make, provider, shape, direction),
                bytes_moved=bytes_moved(shape, direction, provider == IMGGEN_FAST_EPS), elements=shape[0] * shape[1],
                quick=quick, in_speedups=provider != IMGGEN_FAST_EPS,
                check=functools.partial(check, shape, provider) if provider.startswith(IMGGEN_FAST) else None,
                kept_for_backward=functools.partial(kept_for_backward, shape, provider))


def cases() -> list[Case]:
    """Every (size, direction, provider) case, sizes from the smallest."""
    return [_case(size, direction, provider) for size in SIZES for direction in DIRECTIONS for provider in PROVIDERS]


CASES = cases()
