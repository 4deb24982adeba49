"""The LeakyReLU epilogue ops, used by the fused layers.

* ``bias_leaky_relu_(output, bias, negative_slope, channel_dim)``: the forward epilogue,
  ``output = leaky_relu(output + bias)`` in place on a layer's output (bias broadcast
  along ``channel_dim``). Runs below autograd, inside the layers' forward ops.
* ``leaky_relu_backward_from_output(grad_output, output, negative_slope)``: the gradient
  of ``output = leaky_relu(pre)`` with respect to ``pre``, read from the activated
  output (valid for slope >= 0), so the layers keep ``output`` and never ``pre``.
* ``bias_leaky_relu_backward(grad_output, output, negative_slope, channel_dim)``: the same
  gradient and, from the same sweep, its sum over every dim but ``channel_dim`` (the
  bias gradient).

The backward ops are differentiable (double backward): linear in ``grad_output`` with
the same mask, and of zero gradient in ``output`` (the mask is piecewise constant)."""

from __future__ import annotations

import torch

from .. import backends, reference
from ._registration import cpp_op, triton_op



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


def _implementations(name: str, reference_function, fake, backward=None, setup_context=None):
    cpp = cpp_op(name, fake)
    return backends.Implementations(name, reference=reference_function, cpp=cpp, cuda=cpp,
                                    triton=triton_op("leaky_relu", name, fake, backward, setup_context))


IMPLEMENTATIONS = _implementations("leaky_relu_backward_from_output", reference.leaky_relu_backward_from_output,
                                   _fake, _backward, _setup_context)


def leaky_relu_backward_from_output(grad_output: torch.Tensor, output: torch.Tensor,
                                    negative_slope: float) -> torch.Tensor:
    """grad_output, output: equal shapes, dtypes and devices (checked by the caller)."""
    return IMPLEMENTATIONS.select(output.device)(grad_output, output, negative_slope)


def _bias_forward_fake(output: torch.Tensor, bias: torch.Tensor | None, negative_slope: float,
                       channel_dim: int) -> None:
    return None


BIAS_FORWARD = _implementations("bias_leaky_relu_", reference.bias_leaky_relu_, _bias_forward_fake)


def bias_leaky_relu_(output: torch.Tensor, bias: torch.Tensor | None, negative_slope: float,
                     channel_dim: int) -> torch.Tensor:
    """output (*, C, *) contiguous or channels_last, C at ``channel_dim``; bias (C,) or None.
    Applies the epilogue in place and returns ``output``."""
    BIAS_FORWARD.select(output.device)(output, bias, negative_slope, channel_dim)
    return output


def _bias_backward_fake(grad_output, output, negative_slope, channel_dim):
    return torch.empty_like(output), output.new_empty(output.shape[channel_dim])


def _bias_backward_setup_context(ctx, inputs, output) -> None:
    _, saved_output, negative_slope, channel_dim = inputs
    ctx.save_for_backward(saved_output)
    ctx.negative_slope = negative_slope
    ctx.channel_dim = channel_dim


def _bias_backward_backward(ctx, grad_grad_input, grad_grad_bias):
    (saved_output,) = ctx.saved_tensors
    channel_dim = ctx.channel_dim % saved_output.dim()
    total = grad_grad_input if grad_grad_input is not None else torch.zeros_like(saved_output)
    if grad_grad_bias is not None:
        shape = [1] * saved_output.dim()
        shape[channel_dim] = -1
        total = total + grad_grad_bias.reshape(shape)
    return leaky_relu_backward_from_output(total, saved_output, ctx.negative_slope), None, None, None


def _bias_backward_in_place_fake(grad_output, output, negative_slope, channel_dim):
    return output.new_empty(output.shape[channel_dim])


# The in-place variant writes grad_pre into grad_output and returns grad_bias. Only the
# layers' C++ backward calls it, when it owns grad_output outright (csrc/layer_leaky_relu.cpp).
cpp_op("bias_leaky_relu_backward_", _bias_backward_in_place_fake)

BIAS_BACKWARD = _implementations("bias_leaky_relu_backward", reference.bias_leaky_relu_backward,
                                 _bias_backward_fake, _bias_backward_backward, _bias_backward_setup_context)


def bias_leaky_relu_backward(grad_output: torch.Tensor, output: torch.Tensor, negative_slope: float,
                             channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_output, output (*, C, *), C at ``channel_dim``: returns (grad_pre, grad_bias (C,))."""
    return BIAS_BACKWARD.select(output.device)(grad_output, output, negative_slope, channel_dim)
