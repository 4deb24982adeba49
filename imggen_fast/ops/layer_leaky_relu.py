"""The fused layers: ``leaky_relu(layer(input, weight) + bias, negative_slope)`` for
ConvTranspose2d, Conv2d and Linear (schemas in csrc/registration.cpp).

Forward, one op per layer (csrc/layer_leaky_relu.cpp): ATen's layer with the epilogue in
place on its output, or oneDNN's fused post-op on CPU; with the Triton backend chosen,
the convolutions run in Triton's implicit-GEMM kernel with the epilogue in its store
(kernels/layer_leaky_relu.py). Saved for backward: ``input``, ``weight`` and the
activated ``output``, never the pre-activation. Backward (the one autograd formula, in
C++): one sweep turning grad_output into the pre-activation gradient and the bias
gradient (``bias_leaky_relu_backward``), then the layer's input and weight gradients
from ATen. Every piece of the backward is differentiable, so double backward (R1 /
gradient penalties) works."""

from __future__ import annotations

import math

import torch

from .. import backends, reference
from ._registration import op, register_fake

# The Triton kernels cover groups == 1 and fp32/bf16/fp16; anything else on the
# Triton backend goes to the reference with a one-time warning.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

register_fake("conv_transpose2d_leaky_relu",
              lambda input, weight, bias, stride, padding, output_padding, groups, dilation, negative_slope:
              torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, True, output_padding, groups))
register_fake("conv2d_leaky_relu",
              lambda input, weight, bias, stride, padding, dilation, groups, negative_slope:
              torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, False, [0, 0], groups))
register_fake("linear_leaky_relu", lambda input, weight, bias, negative_slope:
              input.new_empty((*input.shape[:-1], weight.shape[0])))


def triton_gap(input: torch.Tensor, groups: int, weight: torch.Tensor, output_sample: int) -> str | None:
    """Why the Triton convolution does not cover this call, or None. ``output_sample``: the
    elements of one output sample."""
    if groups != 1:
        return f"groups={groups} is not covered by the Triton kernels (groups=1 only)"
    if input.dtype not in TRITON_DTYPES:
        return f"{input.dtype} is not covered by the Triton kernels (float32, bfloat16, float16)"
    # The convolution kernel indexes within a sample, and the weight, with 32-bit offsets.
    if max(math.prod(input.shape[1:]), weight.numel(), output_sample) >= 2**31:
        return ("a sample or weight of 2**31 elements or more is not covered by the Triton kernels "
                "(32-bit offsets within a sample)")
    return None


# A layer with no input channels (its output is the bias alone) is eager's business: the
# kernels' GEMMs and oneDNN's fused convolution do not take an empty reduction.
_EMPTY_REDUCTION = "a weight with zero elements (no input channels) is not covered by the kernels"


def _backend(name: str, input: torch.Tensor, weight: torch.Tensor, triton_gap) -> str:
    """The backend serving a layer call; ``triton_gap()`` says why Triton does not cover it, if so."""
    backend = backends.choose(input.device.type)
    if backends.falls_back(name, backend, _EMPTY_REDUCTION if weight.numel() == 0 else None):
        return "reference"
    if backend == "triton" and backends.falls_back(name, backend, triton_gap()):
        return "reference"
    return backend


def conv_transpose2d_leaky_relu(input, weight, bias, stride, padding, output_padding, groups, dilation,
                                negative_slope, output_size):
    """input (N, C_in, H, W), weight (C_in, C_out / groups, kH, kW), bias (C_out,) or None;
    pairs of ints for stride, padding, output_padding, dilation, and the output's
    (H_out, W_out) (checked and computed by the caller)."""
    name = "conv_transpose2d_leaky_relu"
    output_sample = weight.shape[1] * groups * output_size[0] * output_size[1]
    if _backend(name, input, weight, lambda: triton_gap(input, groups, weight, output_sample)) == "reference":
        return reference.conv_transpose2d_leaky_relu(input, weight, bias, stride, padding, output_padding, groups,
                                                     dilation, negative_slope)
    return op(name)(input, weight, bias, stride, padding, output_padding, groups, dilation, negative_slope)


def conv2d_leaky_relu(input, weight, bias, stride, padding, dilation, groups, negative_slope, output_size):
    """input (N, C_in, H, W), weight (C_out, C_in / groups, kH, kW), bias (C_out,) or None;
    output_size the output's (H_out, W_out) (computed by the caller)."""
    name = "conv2d_leaky_relu"
    output_sample = weight.shape[0] * output_size[0] * output_size[1]
    if _backend(name, input, weight, lambda: triton_gap(input, groups, weight, output_sample)) == "reference":
        return reference.conv2d_leaky_relu(input, weight, bias, stride, padding, dilation, groups, negative_slope)
    return op(name)(input, weight, bias, stride, padding, dilation, groups, negative_slope)


def linear_leaky_relu(input, weight, bias, negative_slope):
    """input (*, in), weight (out, in), bias (out,) or None -> (*, out)."""
    if _backend("linear_leaky_relu", input, weight, lambda: None) == "reference":
        return reference.linear_leaky_relu(input, weight, bias, negative_slope)
    return op("linear_leaky_relu")(input, weight, bias, negative_slope)


# What each backend runs for these ops (``imggen-fast doctor`` prints it).
IMPLEMENTATIONS = {
    "conv_transpose2d_leaky_relu": {
        "cpp": "oneDNN's transposed convolution with LeakyReLU as a post-op (fp32, stride > 1), else ATen's "
               "convolution + the C++ epilogue in place",
        "cuda": "cuDNN through ATen, then the CUDA C++ bias + LeakyReLU epilogue in place",
        "triton": "Triton's implicit-GEMM convolution with the epilogue in its store",
    },
    "conv2d_leaky_relu": {
        "cpp": "oneDNN's convolution with LeakyReLU as a post-op (fp32), else ATen's convolution + the C++ epilogue",
        "cuda": "cuDNN through ATen, then the CUDA C++ bias + LeakyReLU epilogue in place",
        "triton": "Triton's implicit-GEMM convolution with the epilogue in its store",
    },
    "linear_leaky_relu": {
        "cpp": "ATen's addmm (MKL), then the C++ LeakyReLU epilogue in place",
        "cuda": "cuBLAS through ATen's addmm, then the CUDA C++ epilogue in place",
        "triton": "ATen's addmm, then the Triton epilogue in place",
    },
}
