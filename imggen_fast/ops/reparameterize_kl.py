"""The fused VAE reparameterization + KL (schemas in csrc/registration.cpp).

``reparameterize_kl(mu, logvar, eps, seed, beta, reduction) -> (z, kl)``, the public op
(its autograd: csrc/reparameterize_kl_autograd.cpp), and its kernels (csrc/cpu,
csrc/cuda, kernels/reparameterize_kl.py):

``reparameterize_kl_forward(mu, logvar, eps, seed, beta, reduction) -> (z, kl)``:
``z = mu + eps * exp(0.5 * logvar)`` and the beta-weighted KL of N(mu, exp(logvar)) from
N(0, 1), per sample, reduced. With ``eps=None`` the noise is made in the kernel by
Philox4x32-10 + Box-Muller keyed by ``seed`` (a 1-element int64 tensor on mu's device):
element i (its flat index in mu's memory order) takes normal ``i % 4`` of Triton's
``tl.randn4x(seed, i // 4)``, on every backend.

``reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, eps, seed, beta, reduction)
-> (grad_mu, grad_logvar)``: regenerates the noise from ``seed`` (or reads ``eps``).
Autograd saves mu, logvar and the seed (or eps), nothing of the size of z more. A double
backward takes the eager formula of the gradients (the noise read back from the forward
kernel).

The seed is drawn per call with ``torch.randint`` from ``generator`` or the default
generator of mu's device, so ``torch.manual_seed`` governs the noise, nothing waits for
the device, and ``torch.compile`` traces the draw without a graph break.
"""

from __future__ import annotations

import functools
import re

import torch

from .. import backends, reference
from ._registration import op, register_fake

NAME = "reparameterize_kl"
FORWARD = "reparameterize_kl_forward"
BACKWARD = "reparameterize_kl_backward"
REDUCTIONS = ("batchmean", "sum", "mean", "none")
# Seeds are drawn uniformly from [0, 2**63 - 1): a 63-bit Philox key per call.
_SEED_BOUND = 2**63 - 1
_EPS_REQUIRES_GRAD = "eps requires grad (the kernels treat the noise as a constant)"
# tl.randn4x on int64 offsets runs the 32-bit Philox with the offset's (low, high) words as
# two counter words, which the C++ and CUDA kernels mirror, from Triton 3.4 on (triton PR
# #6832, May 2025; 3.3.1 still switched to a 64-bit Philox for int64 offsets). The floor is
# checked here rather than raised in pyproject.toml: each torch release pins one Triton
# (torch 2.6 and 2.7 pin 3.2 and 3.3), and every other Triton kernel is right on those.
FIRST_TRITON_WITH_32_BIT_PHILOX = (3, 4)


@functools.cache
def triton_noise_gap(version: str | None = None) -> str | None:
    """Why the Triton kernels cannot make the noise with Triton ``version`` (default: the
    installed one, imported only here, once Triton is chosen), or None if they can."""
    if version is None:
        import triton

        version = triton.__version__
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or tuple(map(int, match.groups())) >= FIRST_TRITON_WITH_32_BIT_PHILOX:
        return None
    return (f"Triton {version} draws tl.randn4x noise for int64 offsets with a 64-bit Philox, not the 32-bit one "
            "of the other backends (Triton >= 3.4 does: pip install 'triton>=3.4'); noise from the reference, "
            "or pass eps")


def output_like(mu: torch.Tensor) -> torch.Tensor:
    """An empty tensor in the layout the kernels give z and the gradients: mu's own when
    mu is dense with each sample's elements contiguous (contiguous, channels_last),
    contiguous otherwise (a dense tensor whose batch dimension is not outermost)."""
    output = torch.empty_like(mu)
    samples = mu.shape[0]
    if samples > 1 and output.numel() > 0 and output.stride(0) * samples != output.numel():
        output = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    return output


def _kl_like(mu: torch.Tensor, reduction: str) -> torch.Tensor:
    return mu.new_empty((mu.shape[0],) if reduction == "none" else ())


def _forward_fake(mu, logvar, eps, seed, beta, reduction):
    return output_like(mu), _kl_like(mu, reduction)


register_fake(NAME, _forward_fake)
register_fake(FORWARD, _forward_fake)
register_fake(BACKWARD, lambda grad_z, grad_kl, mu, logvar, eps, seed, beta, reduction: (output_like(mu),
                                                                                        output_like(mu)))


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A 1-element int64 seed tensor on ``device``, drawn from ``generator`` (or the default one)."""
    return torch.randint(_SEED_BOUND, (1,), dtype=torch.int64, device=device, generator=generator)


def reparameterize_kl(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None, beta: float,
                      reduction: str, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Arguments checked by the caller. The reference backend draws its noise with
    ``torch.randn`` (as ``reference.reparameterize_kl`` does), the kernels with Philox."""
    backend = backends.choose(mu.device.type)
    if eps is not None:
        gap = _EPS_REQUIRES_GRAD if eps.requires_grad else None
    else:
        gap = triton_noise_gap() if backend == "triton" else None
    if backend == "reference" or backends.falls_back(NAME, backend, gap):
        return reference.reparameterize_kl(mu, logvar, eps, beta=beta, reduction=reduction, generator=generator)
    seed = draw_seed(mu.device, generator) if eps is None else None
    return op(NAME)(mu, logvar, eps, seed, beta, reduction)


# What each backend runs for this op (``imggen-fast doctor`` prints it).
IMPLEMENTATIONS = {NAME: {
    "cpp": "one vectorized pass (AVX2 Philox + Box-Muller noise), backward regenerates the noise",
    "cuda": "one CUDA C++ pass, backward regenerates the noise",
    "triton": "one Triton pass (tl.randn4x noise), backward regenerates the noise",
}}
