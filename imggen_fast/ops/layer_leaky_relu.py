"""The fused layers: ``leaky_relu(layer(input, weight) + bias, negative_slope)`` for
ConvTranspose2d, Conv2d and Linear.

Forward: one op per layer (C++: ATen's layer with the epilogue in place on its output,
or oneDNN's fused post-op on CPU; Triton: an implicit-GEMM kernel with the epilogue in
its store). Saved for backward: ``input``, ``weight`` and the activated ``output``,
never the pre-activation. Backward: one sweep turning grad_output into the
pre-activation gradient and the bias gradient (``bias_leaky_relu_backward``), then the
layer's input and weight gradients from ATen (``aten.convolution_backward``, matmuls).
Every piece of the backward is differentiable, so double backward (R1 / gradient
penalties) works."""

from __future__ import annotations

import math

import torch

from .. import _checks, backends, reference
from . import leaky_relu as epilogue
from ._registration import cpp_op, triton_op

# The Triton kernels cover groups == 1 and fp32/bf16/fp16; anything else on the
# Triton backend goes to the reference with a one-time warning.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _pre_activation_grads(ctx, grad_output: torch.Tensor, output: torch.Tensor, channel_dim: int,
                          bias_needed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if bias_needed:
        return epilogue.bias_leaky_relu_backward(grad_output, output, ctx.negative_slope, channel_dim)
    return epilogue.leaky_relu_backward_from_output(grad_output, output, ctx.negative_slope), None


def _save(ctx, input: torch.Tensor, weight: torch.Tensor, output: torch.Tensor, negative_slope: float,
          both_operands: bool) -> None:
    # As eager's layers (and the C++ twin): always the activated output; for a
    # convolution the input and weight; for a linear layer the weight only if the input
    # needs a gradient and the input only if the weight does.
    needs_input, needs_weight = ctx.needs_input_grad[:2]
    ctx.save_for_backward(input if both_operands or needs_weight else None,
                          weight if both_operands or needs_input else None, output)
    ctx.negative_slope = negative_slope


def _needed(ctx, input, weight) -> tuple[bool, bool, bool]:
    """Which of (input, weight, bias) get a gradient: asked for, and its ingredient saved."""
    needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    return needs_input and weight is not None, needs_weight and input is not None, needs_bias


def _convolution_backward(ctx, grad_output: torch.Tensor):
    input, weight, output = ctx.saved_tensors
    needs_input, needs_weight, needs_bias = _needed(ctx, input, weight)
    grad_pre, grad_bias = _pre_activation_grads(ctx, grad_output, output, 1, needs_bias)
    grad_input = grad_weight = None
    if needs_input or needs_weight:
        grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_pre, input, weight, None, ctx.stride, ctx.padding, ctx.dilation, ctx.transposed,
            ctx.output_padding, ctx.groups, [needs_input, needs_weight, False])
    return (grad_input, grad_weight, grad_bias) + (None,) * ctx.non_tensor_arguments


def _conv_transpose2d_setup_context(ctx, inputs, output) -> None:
    input, weight, _, stride, padding, output_padding, groups, dilation, negative_slope = inputs
    _save(ctx, input, weight, output, negative_slope, both_operands=True)
    ctx.stride, ctx.padding, ctx.output_padding, ctx.dilation = stride, padding, output_padding, dilation
    ctx.groups, ctx.transposed, ctx.non_tensor_arguments = groups, True, 6


def _conv2d_setup_context(ctx, inputs, output) -> None:
    input, weight, _, stride, padding, dilation, groups, negative_slope = inputs
    _save(ctx, input, weight, output, negative_slope, both_operands=True)
    ctx.stride, ctx.padding, ctx.output_padding, ctx.dilation = stride, padding, [0, 0], dilation
    ctx.groups, ctx.transposed, ctx.non_tensor_arguments = groups, False, 5


def _conv_transpose2d_fake(input, weight, bias, stride, padding, output_padding, groups, dilation, negative_slope):
    return torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, True, output_padding, groups)


def _conv2d_fake(input, weight, bias, stride, padding, dilation, groups, negative_slope):
    return torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, False, [0, 0], groups)


def _linear_setup_context(ctx, inputs, output) -> None:
    input, weight, _, negative_slope = inputs
    _save(ctx, input, weight, output, negative_slope, both_operands=False)


def _linear_backward(ctx, grad_output: torch.Tensor):
    input, weight, output = ctx.saved_tensors
    needs_input, needs_weight, needs_bias = _needed(ctx, input, weight)
    grad_pre, grad_bias = _pre_activation_grads(ctx, grad_output, output, -1, needs_bias)
    grad_input = grad_pre @ weight if needs_input else None
    grad_weight = None
    if needs_weight:
        grad_weight = grad_pre.reshape(-1, output.shape[-1]).t() @ input.reshape(-1, input.shape[-1])
    return grad_input, grad_weight, grad_bias, None


def _linear_fake(input, weight, bias, negative_slope):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def _implementations(name: str, reference_function, fake, backward, setup_context) -> backends.Implementations:
    cpp = cpp_op(name, fake)
    return backends.Implementations(name, reference=reference_function, cpp=cpp, cuda=cpp,
                                    triton=triton_op("layer_leaky_relu", name, fake, backward, setup_context))


CONV_TRANSPOSE2D = _implementations("conv_transpose2d_leaky_relu", reference.conv_transpose2d_leaky_relu,
                                    _conv_transpose2d_fake, _convolution_backward, _conv_transpose2d_setup_context)
CONV2D = _implementations("conv2d_leaky_relu", reference.conv2d_leaky_relu, _conv2d_fake, _convolution_backward,
                          _conv2d_setup_context)
LINEAR = _implementations("linear_leaky_relu", reference.linear_leaky_relu, _linear_fake, _linear_backward,
                          _linear_setup_context)


def _triton_gap(input: torch.Tensor, groups: int, weight: torch.Tensor | None = None,
                output_sample: int = 0) -> str | None:
    """Why the Triton kernels do not cover this call, or None. ``output_sample``: the
    elements of one output sample of a convolution."""
    if groups != 1:
        return f"groups={groups} is not covered by the Triton kernels (groups=1 only)"
    if input.dtype not in TRITON_DTYPES:
        return f"{input.dtype} is not covered by the Triton kernels (float32, bfloat16, float16)"
    # The convolution kernels index within a sample, and the weight, with 32-bit offsets.
    sizes = [math.prod(input.shape[1:])] if input.dim() == 4 else []
    sizes += [weight.numel(), output_sample] if weight is not None else []
    if max(sizes, default=0) >= 2**31:
        return ("a sample or weight of 2**31 elements or more is not covered by the Triton kernels "
                "(32-bit offsets within a sample)")
    return None


def _run(implementation, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *arguments):
    """``implementation(input, weight, bias, *arguments)``. Under torch.autocast the operands
    are first cast to its lower-precision dtype (float64 left alone) and the call runs with
    autocast off, as torch's layers take them: the Triton ops, registered in Python, have
    no autocast kernel (the C++ ops' kernel in csrc/layer_leaky_relu.cpp does the same for
    direct calls)."""
    if not _checks.autocasting(input):
        return implementation(input, weight, bias, *arguments)
    device_type = input.device.type
    dtype = torch.get_autocast_dtype(device_type)

    def cast(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return tensor.to(dtype) if tensor is not None and tensor.dtype != torch.float64 else tensor

    with torch.autocast(device_type, enabled=False):
        return implementation(cast(input), cast(weight), cast(bias), *arguments)


def conv_transpose2d_leaky_relu(input, weight, bias, stride, padding, output_padding, groups, dilation,
                                negative_slope, output_size):
    """input (N, C_in, H, W), weight (C_in, C_out / groups, kH, kW), bias (C_out,) or None;
    pairs of ints for stride, padding, output_padding, dilation, and the output's
    (H_out, W_out) (checked and computed by the caller)."""
    gap = _triton_gap(input, groups, weight, weight.shape[1] * groups * output_size[0] * output_size[1])
    implementation = CONV_TRANSPOSE2D.select(input.device, gap, ("triton",))
    return _run(implementation, input, weight, bias, stride, padding, output_padding, groups, dilation,
                negative_slope)


def conv2d_leaky_relu(input, weight, bias, stride, padding, dilation, groups, negative_slope, output_size):
    """input (N, C_in, H, W), weight (C_out, C_in / groups, kH, kW), bias (C_out,) or None;
    output_size the output's (H_out, W_out) (computed by the caller)."""
    gap = _triton_gap(input, groups, weight, weight.shape[0] * output_size[0] * output_size[1])
    implementation = CONV2D.select(input.device, gap, ("triton",))
    return _run(implementation, input, weight, bias, stride, padding, dilation, groups, negative_slope)


def linear_leaky_relu(input, weight, bias, negative_slope):
    """input (*, in), weight (out, in), bias (out,) or None -> (*, out)."""
    implementation = LINEAR.select(input.device, _triton_gap(input, 1), ("triton",))
    return _run(implementation, input, weight, bias, negative_slope)
