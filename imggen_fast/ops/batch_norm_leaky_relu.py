"""The fused BatchNorm + LeakyReLU (schemas in csrc/registration.cpp).

``batch_norm_leaky_relu(input, running_mean, running_var, weight, bias, training, momentum,
eps, negative_slope) -> output``, the public op, and ``batch_norm_leaky_relu_(...)``, its
in-place form (the output written over ``input``). Their one autograd formula is
csrc/batch_norm_leaky_relu_autograd.cpp; their kernels (csrc/cpu, csrc/cuda,
kernels/batch_norm_leaky_relu.py) are:

``batch_norm_leaky_relu_forward(...) -> (output, mean, invstd)``: in training the
per-channel mean and biased variance from one read pass (fixed blocks, each reduced in
cache, merged in a fixed order: the same bits for any thread count), the running
statistics updated as torch updates them (unbiased variance, ``momentum``); in eval the
running statistics; then ``output = leaky_relu((input - mean) * invstd * weight + bias)``
in one pass. ``batch_norm_leaky_relu_forward_(...) -> (mean, invstd)`` writes the output
over ``input``.

``batch_norm_leaky_relu_backward(grad_output, input, output, mean, invstd, weight, bias,
training, negative_slope) -> (grad_input, grad_weight, grad_bias)``: one reduction pass and
one elementwise pass, x_hat read from ``input`` or, when only ``output`` is given, recovered
from the activated output (InPlace-ABN). ``batch_norm_leaky_relu_backward_(...) ->
(grad_weight, grad_bias)`` writes grad_input over ``grad_output``; the autograd backward
uses it when autograd hands grad_output over and nothing else holds it.

Saved for backward (besides weight, bias and the per-channel mean and invstd):

* the activated output alone, where x_hat can be recovered from it accurately:
  ``negative_slope > 0``, CPU tensors, and every channel with ``|bias| <= 4 |weight|`` (and
  ``min(1, slope) * |weight|`` above the dtype's subnormal range, which only float16's
  6.1e-5 makes a real bound). The next layer keeps that output anyway, so the op costs no
  memory of its own, and the input (a convolution's output) is freed;
* the input otherwise (ReLU, CUDA tensors, a channel whose weight is small against its
  bias, or under torch.compile, whose tracing cannot read the weights): eager's memory.

The in-place form is correct in every case; where the input must be kept it keeps a copy,
and a view is computed out of place and copied in (autograd rewrites a view's history for
one-output functions only), so it saves memory where the output alone is saved and the
input is not a view. ``functional`` uses it only where it was asked to
(``overwrite_input=True``) and the output can be saved alone as far as can be told without
reading the weights: CPU tensors, ``negative_slope > 0``.
"""

from __future__ import annotations

import torch

from .. import backends, reference
from ._registration import op, register_fake

NAME = "batch_norm_leaky_relu"
IN_PLACE = "batch_norm_leaky_relu_"
FORWARD = "batch_norm_leaky_relu_forward"
FORWARD_IN_PLACE = "batch_norm_leaky_relu_forward_"
BACKWARD = "batch_norm_leaky_relu_backward"
BACKWARD_IN_PLACE = "batch_norm_leaky_relu_backward_"


def _statistics_like(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (mean, invstd) the forward kernels return: (C,) in the accumulation dtype."""
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    return input.new_empty(input.shape[1], dtype=dtype), input.new_empty(input.shape[1], dtype=dtype)


def _parameter_gradients_like(saved: torch.Tensor, weight: torch.Tensor | None,
                              mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = weight.dtype if weight is not None else mean.dtype
    return saved.new_empty(saved.shape[1], dtype=dtype), saved.new_empty(saved.shape[1], dtype=dtype)


def _backward_fake(grad_output, input, output, mean, invstd, weight, bias, training, negative_slope):
    saved = input if input is not None else output
    return torch.empty_like(saved), *_parameter_gradients_like(saved, weight, mean)


def _backward_in_place_fake(grad_output, input, output, mean, invstd, weight, bias, training, negative_slope):
    return _parameter_gradients_like(input if input is not None else output, weight, mean)


register_fake(NAME, lambda input, *arguments: torch.empty_like(input))
register_fake(IN_PLACE, lambda input, *arguments: None)
register_fake(FORWARD, lambda input, *arguments: (torch.empty_like(input), *_statistics_like(input)))
register_fake(FORWARD_IN_PLACE, lambda input, *arguments: _statistics_like(input))
register_fake(BACKWARD, _backward_fake)
register_fake(BACKWARD_IN_PLACE, _backward_in_place_fake)


def batch_norm_leaky_relu(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                          weight: torch.Tensor | None, bias: torch.Tensor | None, training: bool, momentum: float,
                          eps: float, negative_slope: float, overwrite_input: bool) -> torch.Tensor:
    """Arguments checked by the caller. ``overwrite_input``: the caller allows the output to
    be written over ``input`` (which then has no other use); done where it saves memory."""
    backend = backends.choose(input.device.type)
    if backend == "reference":
        return reference.batch_norm_leaky_relu(input, running_mean, running_var, weight, bias, training, momentum,
                                               eps, negative_slope)
    arguments = (running_mean, running_var, weight, bias, training, momentum, eps, negative_slope)
    if overwrite_input and negative_slope > 0 and input.device.type == "cpu":
        op(IN_PLACE)(input, *arguments)
        return input
    return op(NAME)(input, *arguments)


# What each backend runs for this op (``imggen-fast doctor`` prints it).
IMPLEMENTATIONS = {NAME: {
    "cpp": "statistics in one read pass (blocks merged in a fixed order), then normalize + activation in one pass; "
           "backward: one reduction pass, one elementwise pass, x_hat recovered from the output where exact",
    "cuda": "the same passes as CUDA C++ kernels (the input is saved for backward: no host sync to read the weights)",
    "triton": "the same passes as Triton kernels (the input is saved for backward)",
}}
