"""Triton kernels of the LeakyReLU epilogue.

``leaky_relu_backward_from_output``: ``grad_input = grad_output * (output > 0 ? 1 : slope)``,
the mask read from the activated output (valid for slope >= 0), one sweep."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._triton_utils import ELEMENTWISE_CONFIGS, AotKernel, autotune, dense, flat_grid, in_layout_of


@triton.jit
def to_accumulator(values):
    """Widens to the accumulation type: fp64 stays fp64, everything else becomes fp32."""
    if values.dtype == tl.float64:
        return values
    return values.to(tl.float32)


@autotune(configs=ELEMENTWISE_CONFIGS, key=["numel"])
@triton.jit
def leaky_relu_backward_from_output_kernel(grad_output_ptr, output_ptr, grad_input_ptr, numel,
                                           negative_slope, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    grad = to_accumulator(tl.load(grad_output_ptr + offsets, mask=in_bounds))
    output = to_accumulator(tl.load(output_ptr + offsets, mask=in_bounds))
    grad_input = tl.where(output > 0, grad, grad * negative_slope)
    tl.store(grad_input_ptr + offsets, grad_input.to(grad_input_ptr.dtype.element_ty), mask=in_bounds)


@triton_op("imggen_fast_triton::leaky_relu_backward_from_output", mutates_args=())
def leaky_relu_backward_from_output(grad_output: torch.Tensor, output: torch.Tensor,
                                    negative_slope: float) -> torch.Tensor:
    """grad_output, output: the same shape (any); returns grad_input in output's layout."""
    output = dense(output)
    grad_output = in_layout_of(grad_output, output)
    grad_input = torch.empty_like(output)
    numel = output.numel()
    if numel:
        wrap_triton(leaky_relu_backward_from_output_kernel)[flat_grid(numel)](
            grad_output, output, grad_input, numel, negative_slope)
    return grad_input


AOT_KERNELS = [
    AotKernel(
        leaky_relu_backward_from_output_kernel,
        {"grad_output_ptr": "*{dtype}", "output_ptr": "*{dtype}", "grad_input_ptr": "*{dtype}",
         "numel": "i64", "negative_slope": "fp32"},
    ),
]
