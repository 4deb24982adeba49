"""Public functions: validate the arguments (each error names the argument at fault,
before any kernel runs), then call the op, which picks the implementation."""

from __future__ import annotations

import torch

from . import _checks
from .ops import leaky_relu as _leaky_relu
from .ops import reparameterize_kl as _reparameterize_kl


def leaky_relu_backward_from_output(grad_output: torch.Tensor, output: torch.Tensor,
                                    negative_slope: float = 0.01) -> torch.Tensor:
    """The gradient of ``output = leaky_relu(pre, negative_slope)`` with respect to ``pre``,
    computed from the activated ``output`` (valid for ``negative_slope >= 0``):
    ``grad_output * (output > 0 ? 1 : negative_slope)``.

    grad_output, output: the same shape (any), dtype and device. Returns a tensor of
    that shape in ``output``'s memory format. Differentiable in ``grad_output``."""
    name = "leaky_relu_backward_from_output"
    _checks.check_floating_tensor(grad_output, "grad_output", name)
    _checks.check_floating_tensor(output, "output", name)
    _checks.check_matches(grad_output, "grad_output", output, "output", name)
    negative_slope = _checks.check_negative_slope(negative_slope, name)
    return _leaky_relu.leaky_relu_backward_from_output(grad_output, output, negative_slope)


def reparameterize_kl(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None, *,
                      beta: float = 1.0, reduction: str = "batchmean",
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE bottleneck in one pass: ``z = mu + eps * exp(0.5 * logvar)`` and
    ``kl = beta * (-0.5) * sum(1 + logvar - mu^2 - exp(logvar))`` over every dim but the
    first, reduced by ``reduction``: ``"batchmean"`` (mean over the batch), ``"sum"``,
    ``"mean"`` (over all elements) or ``"none"`` (one value per sample).

    mu, logvar, eps: (N, *), the same shape, dtype and device. ``eps=None`` makes the
    noise inside the kernel (Philox4x32-10 + Box-Muller, seeded from ``generator`` or
    torch's default generator of mu's device, so ``torch.manual_seed`` makes it
    repeatable); the backward regenerates it instead of storing it. A given ``eps`` is
    used as is. Returns z (N, *) in mu's memory format and kl: a scalar, or (N,) for
    ``reduction="none"``. Differentiable in mu and logvar."""
    name = "reparameterize_kl"
    _checks.check_floating_tensor(mu, "mu", name)
    _checks.check_floating_tensor(logvar, "logvar", name)
    _checks.check_matches(logvar, "logvar", mu, "mu", name)
    if mu.dim() == 0:
        raise ValueError(f"{name}: mu must have a batch dimension, shape (N, *); got a 0-d tensor")
    if eps is not None:
        _checks.check_floating_tensor(eps, "eps", name)
        _checks.check_matches(eps, "eps", mu, "mu", name)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"{name}: beta must be a number, got {type(beta).__name__}")
    if not 0 <= beta < float("inf"):
        raise ValueError(f"{name}: beta must be finite and >= 0 (it weights a divergence), got {beta}")
    _checks.check_choice(reduction, "reduction", _reparameterize_kl.REDUCTIONS, name)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    return _reparameterize_kl.reparameterize_kl(mu, logvar, eps, float(beta), reduction, generator)
