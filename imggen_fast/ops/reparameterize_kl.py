"""The fused VAE reparameterization + KL ops.

``reparameterize_kl_forward(mu, logvar, eps, seed, beta, reduction) -> (z, kl)``:
``z = mu + eps * exp(0.5 * logvar)`` and the beta-weighted KL of N(mu, exp(logvar)) from
N(0, 1), per sample, reduced. With ``eps=None`` the noise is made in the kernel by
Philox4x32-10 + Box-Muller keyed by ``seed`` (a 1-element int64 tensor on mu's device):
element i (its flat index in mu's memory order) takes normal ``i % 4`` of Triton's
``tl.randn4x(seed, i // 4)``, on every backend.

``reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, eps, seed, beta, reduction)
-> (grad_mu, grad_logvar)``: regenerates the noise from ``seed`` (or reads ``eps``).
Autograd saves mu, logvar and the seed (or eps), nothing of the size of z more.

The seed is drawn per call with ``torch.randint`` from ``generator`` or the default
generator of mu's device, so ``torch.manual_seed`` governs the noise, nothing waits for
the device, and ``torch.compile`` traces the draw without a graph break.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import backends, reference
from ._registration import cpp_op, triton_op

NAME = "reparameterize_kl"
FORWARD = "reparameterize_kl_forward"
BACKWARD = "reparameterize_kl_backward"
REDUCTIONS = ("batchmean", "sum", "mean", "none")
# Seeds are drawn uniformly from [0, 2**63 - 1): a 63-bit Philox key per call.
_SEED_BOUND = 2**63 - 1
_EPS_REQUIRES_GRAD = "eps requires grad (the kernels treat the noise as a constant)"


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


def _backward_fake(grad_z, grad_kl, mu, logvar, eps, seed, beta, reduction):
    return output_like(mu), output_like(mu)


def _setup_context(ctx, inputs, output) -> None:
    mu, logvar, eps, seed, beta, reduction = inputs
    ctx.save_for_backward(mu, logvar, eps, seed)
    ctx.beta = beta
    ctx.reduction = reduction
    # z or kl may be unused: their gradient then arrives as None, and the kernel skips it.
    ctx.set_materialize_grads(False)


def _autograd_backward(backward_op: Callable[[], Callable]) -> Callable:
    """The autograd formula of a forward op, calling the backward op of the same backend."""

    def backward(ctx, grad_z, grad_kl):
        mu, logvar, eps, seed = ctx.saved_tensors
        grad_mu, grad_logvar = backward_op()(grad_z, grad_kl, mu, logvar, eps, seed, ctx.beta, ctx.reduction)
        needs_mu, needs_logvar = ctx.needs_input_grad[:2]
        return (grad_mu if needs_mu else None), (grad_logvar if needs_logvar else None), None, None, None, None

    return backward


# The C++ op's autograd is C++ (csrc/cpu/reparameterize_kl.cpp, the Autograd key): the
# Python path of register_autograd costs more than the kernels at VAE latent sizes.
cpp_op(BACKWARD, _backward_fake)
_cpp_forward = cpp_op(FORWARD, _forward_fake)
_triton_backward = triton_op(NAME, BACKWARD, _backward_fake)
_triton_forward = triton_op(NAME, FORWARD, _forward_fake, _autograd_backward(_triton_backward), _setup_context)

IMPLEMENTATIONS = backends.Implementations(
    NAME,
    reference=reference.reparameterize_kl,
    cpp=_cpp_forward,
    cuda=_cpp_forward,
    triton=_triton_forward,
)


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A 1-element int64 seed tensor on ``device``, drawn from ``generator`` (or the default one)."""
    return torch.randint(_SEED_BOUND, (1,), dtype=torch.int64, device=device, generator=generator)


def reparameterize_kl(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None, beta: float,
                      reduction: str, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Arguments checked by the caller. The reference backend draws its noise with
    ``torch.randn`` (as ``reference.reparameterize_kl`` does), the kernels with Philox."""
    unsupported = _EPS_REQUIRES_GRAD if eps is not None and eps.requires_grad else None
    implementation = IMPLEMENTATIONS.select(mu.device, unsupported)
    if implementation is reference.reparameterize_kl:
        return implementation(mu, logvar, eps, beta=beta, reduction=reduction, generator=generator)
    seed = draw_seed(mu.device, generator) if eps is None else None
    return implementation(mu, logvar, eps, seed, beta, reduction)
