"""The LeakyReLU epilogue ops, used by the fused layers (schemas in csrc/registration.cpp).

* ``bias_leaky_relu_(output, bias, negative_slope, channel_dim)``: the forward epilogue,
  ``output = leaky_relu(output + bias)`` in place on a layer's output (bias broadcast
  along ``channel_dim``). Runs below autograd, inside the layers' forward ops.
* ``leaky_relu_backward_from_output(grad_output, output, negative_slope)``: the gradient
  of ``output = leaky_relu(pre)`` with respect to ``pre``, read from the activated
  output (valid for slope >= 0), so the layers keep ``output`` and never ``pre``.
* ``bias_leaky_relu_backward(grad_output, output, negative_slope, channel_dim)``: the same
  gradient and, from the same sweep, its sum over every dim but ``channel_dim`` (the
  bias gradient); ``bias_leaky_relu_backward_`` writes the gradient in place into
  grad_output (the layers' backward uses it when it owns grad_output outright).

The backward ops are differentiable (double backward, csrc/leaky_relu_autograd.cpp):
linear in ``grad_output`` with the same mask, and of zero gradient in ``output`` (the
mask is piecewise constant). Kernels: csrc/cpu/leaky_relu.cpp, csrc/cuda/leaky_relu.cu,
kernels/leaky_relu.py."""

from __future__ import annotations

import torch

from .. import backends, reference
from ._registration import op, register_fake

register_fake("leaky_relu_backward_from_output",
              lambda grad_output, output, negative_slope: torch.empty_like(output))
register_fake("bias_leaky_relu_", lambda output, bias, negative_slope, channel_dim: None)
register_fake("bias_leaky_relu_backward", lambda grad_output, output, negative_slope, channel_dim: (
    torch.empty_like(output), output.new_empty(output.shape[channel_dim])))
register_fake("bias_leaky_relu_backward_", lambda grad_output, output, negative_slope, channel_dim:
              output.new_empty(output.shape[channel_dim]))


def leaky_relu_backward_from_output(grad_output: torch.Tensor, output: torch.Tensor,
                                    negative_slope: float) -> torch.Tensor:
    """grad_output, output: equal shapes, dtypes and devices (checked by the caller)."""
    if backends.choose(output.device.type) == "reference":
        return reference.leaky_relu_backward_from_output(grad_output, output, negative_slope)
    return op("leaky_relu_backward_from_output")(grad_output, output, negative_slope)
