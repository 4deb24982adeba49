"""The LeakyReLU epilogue ops.

``leaky_relu_backward_from_output(grad_output, output, negative_slope)``: the gradient of
``output = leaky_relu(pre)`` with respect to ``pre``, read from the activated output.
The fused layers save only ``output`` and use this in their backward. Its own
gradient (needed for double backward) is linear in ``grad_output`` with the same
mask, and zero with respect to ``output`` (the mask is piecewise constant)."""

from __future__ import annotations

import torch

from .. import backends, reference
from ._registration import cpp_op, triton_op

NAME = "leaky_relu_backward_from_output"


def _fake(grad_output: torch.Tensor, output: torch.Tensor, negative_slope: float) -> torch.Tensor:
    return torch.empty_like(output)


def _setup_context(ctx, inputs, output) -> None:
    _, saved_output, negative_slope = inputs
    ctx.save_for_backward(saved_output)
    ctx.negative_slope = negative_slope


def _backward(ctx, grad_grad_input: torch.Tensor):
    (saved_output,) = ctx.saved_tensors
    grad_grad_output = leaky_relu_backward_from_output(grad_grad_input, saved_output, ctx.negative_slope)
    return grad_grad_output, None, None


_cpp = cpp_op(NAME, _fake, _backward, _setup_context)
IMPLEMENTATIONS = backends.Implementations(
    NAME,
    reference=reference.leaky_relu_backward_from_output,
    cpp=_cpp,
    cuda=_cpp,
    triton=triton_op("leaky_relu", NAME, _fake, _backward, _setup_context),
)


def leaky_relu_backward_from_output(grad_output: torch.Tensor, output: torch.Tensor,
                                    negative_slope: float) -> torch.Tensor:
    """grad_output, output: equal shapes, dtypes and devices (checked by the caller)."""
    return IMPLEMENTATIONS.select(output.device)(grad_output, output, negative_slope)
