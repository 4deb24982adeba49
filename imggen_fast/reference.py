"""The eager formulas of every imggen_fast op: the ground truth the kernels are tested
against, and the implementation that serves a call no kernel covers.

Pure torch, differentiable (to any order), no imports from the rest of the package.
Shapes use N for the batch, C for channels, H x W for images, ``*`` for any dims.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_KL_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def leaky_relu_backward_from_output(grad_output: torch.Tensor, output: torch.Tensor,
                                    negative_slope: float) -> torch.Tensor:
    """Gradient of ``output = leaky_relu(pre, slope)`` with respect to ``pre``, read from
    ``output`` (``sign(output) == sign(pre)`` for slope >= 0). Shapes: any, equal."""
    return torch.where(output > 0, grad_output, grad_output * negative_slope)


def _channel_shape(tensor: torch.Tensor, channel_dim: int) -> list[int]:
    shape = [1] * tensor.dim()
    shape[channel_dim] = -1
    return shape


def bias_leaky_relu_(output: torch.Tensor, bias: torch.Tensor | None, negative_slope: float,
                     channel_dim: int) -> None:
    """``output = leaky_relu(output + bias, slope)`` in place, bias (C,) broadcast along
    ``channel_dim`` of output (*, C, *). Returns nothing, as the op does."""
    if bias is not None:
        output.add_(bias.reshape(_channel_shape(output, channel_dim)))
    F.leaky_relu_(output, negative_slope)


def bias_leaky_relu_backward(grad_output: torch.Tensor, output: torch.Tensor, negative_slope: float,
                             channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_pre, grad_bias): the LeakyReLU gradient read from ``output`` and its sum over
    every dim but ``channel_dim``. grad_output, output (*, C, *) -> ((*, C, *), (C,))."""
    grad_pre = leaky_relu_backward_from_output(grad_output, output, negative_slope)
    dims = [d for d in range(output.dim()) if d != channel_dim % output.dim()]
    return grad_pre, grad_pre.sum(dim=dims) if dims else grad_pre.clone()


def conv_transpose2d_leaky_relu(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                                stride=1, padding=0, output_padding=0, groups: int = 1, dilation=1,
                                negative_slope: float = 0.01) -> torch.Tensor:
    """``leaky_relu(conv_transpose2d(input, weight, bias, ...), slope)``.

    input (N, C_in, H, W), weight (C_in, C_out / groups, kH, kW), bias (C_out,) ->
    (N, C_out, H_out, W_out)."""
    return F.leaky_relu(F.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation),
                        negative_slope)


def conv2d_leaky_relu(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      stride=1, padding=0, dilation=1, groups: int = 1,
                      negative_slope: float = 0.01) -> torch.Tensor:
    """``leaky_relu(conv2d(input, weight, bias, ...), slope)``.

    input (N, C_in, H, W), weight (C_out, C_in / groups, kH, kW), bias (C_out,) ->
    (N, C_out, H_out, W_out)."""
    return F.leaky_relu(F.conv2d(input, weight, bias, stride, padding, dilation, groups), negative_slope)


def linear_leaky_relu(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      negative_slope: float = 0.01) -> torch.Tensor:
    """``leaky_relu(input @ weight.T + bias, slope)``: input (*, in), weight (out, in),
    bias (out,) -> (*, out)."""
    return F.leaky_relu(F.linear(input, weight, bias), negative_slope)


def kl_per_sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``-0.5 * sum(1 + logvar - mu^2 - exp(logvar))`` over every dim but the first:
    mu, logvar (N, *) -> (N,)."""
    terms = 1 + logvar - mu.pow(2) - logvar.exp()
    # An explicit sample size, not -1: reshape cannot infer it for an empty batch.
    return -0.5 * terms.reshape(terms.shape[0], math.prod(terms.shape[1:])).sum(dim=1)


def reduce_kl(per_sample: torch.Tensor, reduction: str, elements_per_sample: int) -> torch.Tensor:
    """Reduces a per-sample KL vector (N,): ``batchmean`` (mean over the batch), ``sum``,
    ``mean`` (over all N * elements_per_sample elements) or ``none`` (the vector).
    The means of an empty batch are NaN, as torch's means are."""
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "batchmean":
        return per_sample.sum() / per_sample.shape[0]
    if reduction == "mean":
        return per_sample.sum() / (per_sample.shape[0] * elements_per_sample)
    raise ValueError(f"reduction must be one of {_KL_REDUCTIONS}, got {reduction!r}")


def reparameterize_kl(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None, *,
                      beta: float = 1.0, reduction: str = "batchmean",
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE bottleneck: ``z = mu + eps * exp(0.5 * logvar)`` and the beta-weighted KL
    divergence of N(mu, exp(logvar)) from N(0, 1).

    mu, logvar, eps: (N, *), equal shapes; ``eps=None`` draws ``torch.randn_like(mu)``
    (from ``generator`` if given). Returns z (N, *) and kl: a scalar, or (N,) for
    ``reduction="none"``."""
    if eps is None:
        eps = torch.randn(mu.shape, dtype=mu.dtype, device=mu.device, generator=generator)
    z = mu + eps * torch.exp(0.5 * logvar)
    elements_per_sample = math.prod(mu.shape[1:])
    kl = beta * reduce_kl(kl_per_sample(mu, logvar), reduction, elements_per_sample)
    return z, kl


def bce_with_logits(input: torch.Tensor, target: torch.Tensor | float, weight: torch.Tensor | None = None,
                    reduction: str = "mean", pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``F.binary_cross_entropy_with_logits``, with ``target`` also allowed to be a number
    (a label such as 1.0, or 0.9 for label smoothing). input (*); target, weight,
    pos_weight broadcast against it. Returns a scalar, or (*) for ``reduction="none"``."""
    if not isinstance(target, torch.Tensor):
        target = torch.full_like(input, float(target))
    return F.binary_cross_entropy_with_logits(input, target, weight, reduction=reduction, pos_weight=pos_weight)


def gan_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, real_label: float = 1.0,
               fake_label: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """The discriminator loss ``bce(real_logits, real_label) + bce(fake_logits, fake_label)``.
    real_logits (*), fake_logits (*): any shapes. ``reduction="none"`` needs equal shapes."""
    return (bce_with_logits(real_logits, real_label, reduction=reduction)
            + bce_with_logits(fake_logits, fake_label, reduction=reduction))


def gan_g_loss(fake_logits: torch.Tensor, real_label: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """The non-saturating generator loss ``bce(fake_logits, real_label)``. fake_logits (*)."""
    return bce_with_logits(fake_logits, real_label, reduction=reduction)


def batch_norm_leaky_relu(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                          weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                          training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                          negative_slope: float = 0.01) -> torch.Tensor:
    """``leaky_relu(F.batch_norm(input, running_mean, running_var, weight, bias, training,
    momentum, eps), negative_slope)``, updating the running statistics in place as
    ``F.batch_norm`` does. input (N, C, *); running_mean, running_var, weight, bias (C,)
    or None."""
    normalized = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    # In place on batch_norm's fresh output, as the eager pair BatchNorm -> ReLU(inplace=True)
    # runs: autograd then keeps one tensor (the activated output, which batch_norm's backward
    # does not need) instead of two. The in-place backward reads the mask from the output,
    # valid for slope >= 0 only.
    return F.leaky_relu(normalized, negative_slope, inplace=negative_slope >= 0)
