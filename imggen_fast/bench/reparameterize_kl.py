"""Benchmark cases of ``reparameterize_kl``: the VAE bottleneck, fp32, noise included.

Providers: ``eager`` (the reference with ``torch.randn_like`` noise), ``imggen_fast``
(the fused op making its noise in the kernel), ``compile`` (``torch.compile`` of the
eager function) and, for the bandwidth target, ``imggen_fast_eps`` (the fused op with
``eps`` given, so that it only streams memory). Sizes (batch x latent): from the
overhead-bound 128x32 to the bandwidth-bound 256x65536 (16.8M elements).

``bytes_moved`` is what the op must read and write, the same for every provider of a
case: forward reads mu and logvar (and eps if given) and writes z; backward reads
grad_z, mu and logvar (and eps) and writes grad_mu and grad_logvar; the KL scalars are
negligible."""

from __future__ import annotations

import torch

from .. import functional, reference
from .common import COMPILE, DIRECTIONS, EAGER, IMGGEN_FAST, Case, backward_only, compiled

OP = "reparameterize_kl"
IMGGEN_FAST_EPS = "imggen_fast_eps"
PROVIDERS = (EAGER, IMGGEN_FAST, COMPILE, IMGGEN_FAST_EPS)
SIZES = {"128x32": (128, 32), "128x128": (128, 128), "256x4096": (256, 4096), "256x65536": (256, 65536)}
_FLOAT32_BYTES = 4
# Tensors of the size of mu each direction reads and writes, without and with eps.
_STREAMS = {"forward": (3, 4), "backward": (5, 6), "both": (8, 10)}


def eager_reparameterize_kl(mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager VAE bottleneck as users write it: noise from torch.randn_like."""
    return reference.reparameterize_kl(mu, logvar, torch.randn_like(mu))


def _forward(provider: str, mu: torch.Tensor, logvar: torch.Tensor):
    if provider == EAGER:
        return lambda: eager_reparameterize_kl(mu, logvar)
    if provider == COMPILE:
        step = compiled(eager_reparameterize_kl)
        return lambda: step(mu, logvar)
    if provider == IMGGEN_FAST:
        return lambda: functional.reparameterize_kl(mu, logvar)
    if provider == IMGGEN_FAST_EPS:
        eps = torch.randn_like(mu)
        return lambda: functional.reparameterize_kl(mu, logvar, eps)
    raise ValueError(f"unknown provider {provider!r}")


def _maker(provider: str, shape: tuple[int, int], direction: str):
    def make():
        generator = torch.Generator().manual_seed(0)
        mu = torch.randn(shape, generator=generator).requires_grad_()
        logvar = (torch.randn(shape, generator=generator) * 0.5).requires_grad_()
        forward = _forward(provider, mu, logvar)
        if direction == "backward":
            return backward_only(forward)  # compiles, for torch.compile, as a backward-only case must
        forward()  # compiles (torch.compile) and builds the kernels before timing
        if direction == "forward":
            return forward
        grad_z, grad_kl = torch.ones(shape), torch.ones(())

        def forward_and_backward() -> None:
            z, kl = forward()
            torch.autograd.backward((z, kl), (grad_z, grad_kl))

        return forward_and_backward

    return make


def bytes_moved(shape: tuple[int, int], direction: str, with_eps: bool) -> int:
    return _STREAMS[direction][with_eps] * shape[0] * shape[1] * _FLOAT32_BYTES


def cases() -> list[Case]:
    """Every (size, direction, provider) case, sizes from the smallest."""
    return [
        Case(OP, size, provider, direction, _maker(provider, shape, direction),
             bytes_moved=bytes_moved(shape, direction, provider == IMGGEN_FAST_EPS))
        for size, shape in SIZES.items()
        for direction in DIRECTIONS
        for provider in PROVIDERS
    ]
