"""Triton kernels of the fused BatchNorm + LeakyReLU (see imggen_fast/ops/batch_norm_leaky_relu.py).

The input is seen as (outer, channels, inner) around its channel dim 1, element (o, c, i) at
o * channels * inner + c * inner + i: contiguous tensors, and tensors whose channels are
innermost in memory (channels_last, channels_last_3d; inner = 1). Other layouts are copied
once into the one they suggest.

* ``batch_norm_leaky_relu_forward`` / ``_forward_``: per (block of ``REDUCTION_BLOCK``
  elements, channel) program, the block's mean and sum of squared deviations (two passes
  over the block held in registers); one program per channel merges its blocks' moments
  in a fixed order (mean = sum(n_b mean_b) / n, m2 = sum(m2_b + n_b (mean_b - mean)^2));
  then one elementwise pass y = leaky_relu(x * scale + shift). The per-channel vectors
  (invstd, running statistics, scale, shift) are computed with torch on C elements.
* ``batch_norm_leaky_relu_backward``: per (block, channel) program the sums of g_pre and
  g_pre * x_hat, each channel's sums added in a fixed order (kernels/leaky_relu.py's
  channel_sum_kernel), then one elementwise pass grad_x = g_pre * k + v * p + q (v: the
  input, or the pre-activation recovered from the output).

No atomics: the results do not depend on the order programs run in."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import leaky_relu as _leaky_relu
from ._triton_utils import ELEMENTWISE_CONFIGS, autotune, flat_grid
from .leaky_relu import to_accumulator

# Elements of one channel per reduction program, and per tile of the merge: fixed (not
# tuned), since they decide how the sums are split, and with it their bits.
REDUCTION_BLOCK = 1024
MERGE_BLOCK = 256


@triton.jit
def channel_offsets(block, channel, count, channels, inner, BLOCK: tl.constexpr):
    """The memory offsets of block ``block`` of channel ``channel`` (its elements j in
    [block * BLOCK, (block + 1) * BLOCK) of ``count``, (o, i) = divmod(j, inner)) and their mask."""
    j = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = j < count
    return (j // inner) * channels * inner + channel * inner + j % inner, in_bounds


@triton.jit
def block_moments_kernel(input_ptr, mean_ptr, m2_ptr, count, channels, inner, BLOCK: tl.constexpr):
    """mean and m2 (sum of squared deviations from it) of one block of one channel, at
    [channel, block] of the (channels, blocks) partial arrays."""
    block = tl.program_id(0)
    channel = tl.program_id(1).to(tl.int64)
    offsets, in_bounds = channel_offsets(block, channel, count, channels, inner, BLOCK)
    values = to_accumulator(tl.load(input_ptr + offsets, mask=in_bounds, other=0))
    elements = tl.minimum(count - block.to(tl.int64) * BLOCK, BLOCK).to(values.dtype)
    mean = tl.sum(values, axis=0) / elements
    deviations = tl.where(in_bounds, values - mean, 0)
    partial = channel * tl.num_programs(0) + block
    tl.store(mean_ptr + partial, mean)
    tl.store(m2_ptr + partial, tl.sum(deviations * deviations, axis=0))


@triton.jit
def merge_moments_kernel(block_mean_ptr, block_m2_ptr, mean_ptr, m2_ptr, blocks, count, REDUCTION: tl.constexpr,
                         BLOCK: tl.constexpr):
    """One channel's mean and m2 from its blocks' (every block holds REDUCTION elements but
    the last): the mean first, then the blocks' m2 and the spread of their means about it."""
    channel = tl.program_id(0).to(tl.int64)
    first = block_mean_ptr + channel * blocks
    weighted = tl.zeros([BLOCK], dtype=block_mean_ptr.dtype.element_ty)
    for start in range(0, blocks, BLOCK):
        index = start + tl.arange(0, BLOCK)
        elements = tl.minimum(count - index.to(tl.int64) * REDUCTION, REDUCTION).to(weighted.dtype)
        weighted += tl.where(index < blocks, elements * tl.load(first + index, mask=index < blocks, other=0), 0)
    mean = tl.sum(weighted, axis=0) / count
    spread = tl.zeros([BLOCK], dtype=block_mean_ptr.dtype.element_ty)
    for start in range(0, blocks, BLOCK):
        index = start + tl.arange(0, BLOCK)
        in_bounds = index < blocks
        elements = tl.minimum(count - index.to(tl.int64) * REDUCTION, REDUCTION).to(spread.dtype)
        deviation = tl.load(first + index, mask=in_bounds, other=0) - mean
        block_m2 = tl.load(block_m2_ptr + channel * blocks + index, mask=in_bounds, other=0)
        spread += tl.where(in_bounds, block_m2 + elements * deviation * deviation, 0)
    tl.store(mean_ptr + channel, mean)
    tl.store(m2_ptr + channel, tl.sum(spread, axis=0))


@autotune(configs=ELEMENTWISE_CONFIGS, key=["numel"])
@triton.jit
def normalize_activate_kernel(input_ptr, output_ptr, scale_ptr, shift_ptr, numel, channels, inner, negative_slope,
                              BLOCK: tl.constexpr):
    """y = leaky_relu(x * scale + shift) (output_ptr may be input_ptr)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    channel = (offsets // inner) % channels
    values = to_accumulator(tl.load(input_ptr + offsets, mask=in_bounds))
    pre = tl.fma(values, tl.load(scale_ptr + channel, mask=in_bounds), tl.load(shift_ptr + channel, mask=in_bounds))
    tl.store(output_ptr + offsets, tl.where(pre > 0, pre, pre * negative_slope).to(output_ptr.dtype.element_ty),
             mask=in_bounds)


@triton.jit
def read_saved(saved, grad, scale, shift, negative_slope, inverse_slope, FROM_OUTPUT: tl.constexpr):
    """(v, g_pre): v the pre-activation recovered from the output, or the input itself; the
    mask from the output's sign, or from the forward's pre-activation recomputed."""
    if FROM_OUTPUT:
        positive = saved > 0
        value = tl.where(positive, saved, saved * inverse_slope)
    else:
        positive = tl.fma(saved, scale, shift) > 0
        value = saved
    return value, tl.where(positive, grad, grad * negative_slope)


@triton.jit
def block_gradient_sums_kernel(grad_output_ptr, saved_ptr, scale_ptr, shift_ptr, value_scale_ptr, value_shift_ptr,
                               sum_g_ptr, sum_gx_ptr, count, channels, inner, negative_slope, inverse_slope,
                               FROM_OUTPUT: tl.constexpr, BLOCK: tl.constexpr):
    """sum(g_pre) and sum(g_pre * x_hat) of one block of one channel, at [channel, block]."""
    block = tl.program_id(0)
    channel = tl.program_id(1).to(tl.int64)
    offsets, in_bounds = channel_offsets(block, channel, count, channels, inner, BLOCK)
    saved = to_accumulator(tl.load(saved_ptr + offsets, mask=in_bounds, other=0))
    grad = to_accumulator(tl.load(grad_output_ptr + offsets, mask=in_bounds, other=0))
    value, grad_pre = read_saved(saved, grad, tl.load(scale_ptr + channel), tl.load(shift_ptr + channel),
                                 negative_slope, inverse_slope, FROM_OUTPUT)
    normalized = tl.fma(value, tl.load(value_scale_ptr + channel), tl.load(value_shift_ptr + channel))
    partial = channel * tl.num_programs(0) + block
    tl.store(sum_g_ptr + partial, tl.sum(grad_pre, axis=0))
    tl.store(sum_gx_ptr + partial, tl.sum(tl.where(in_bounds, grad_pre * normalized, 0), axis=0))


@autotune(configs=ELEMENTWISE_CONFIGS, key=["numel"])
@triton.jit
def input_gradient_kernel(grad_output_ptr, saved_ptr, grad_input_ptr, scale_ptr, shift_ptr, k_ptr, p_ptr, q_ptr,
                          numel, channels, inner, negative_slope, inverse_slope, FROM_OUTPUT: tl.constexpr,
                          BLOCK: tl.constexpr):
    """grad_x = g_pre * k + v * p + q."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    channel = (offsets // inner) % channels
    saved = to_accumulator(tl.load(saved_ptr + offsets, mask=in_bounds))
    grad = to_accumulator(tl.load(grad_output_ptr + offsets, mask=in_bounds))
    value, grad_pre = read_saved(saved, grad, tl.load(scale_ptr + channel, mask=in_bounds),
                                 tl.load(shift_ptr + channel, mask=in_bounds), negative_slope, inverse_slope,
                                 FROM_OUTPUT)
    result = tl.fma(grad_pre, tl.load(k_ptr + channel, mask=in_bounds),
                    tl.fma(value, tl.load(p_ptr + channel, mask=in_bounds), tl.load(q_ptr + channel, mask=in_bounds)))
    tl.store(grad_input_ptr + offsets, result.to(grad_input_ptr.dtype.element_ty), mask=in_bounds)


# --- launchers --------------------------------------------------------------------------


def _channels_innermost(tensor: torch.Tensor) -> bool:
    """True when moving dim 1 last would make the tensor contiguous (size-1 dims ignored)."""
    if tensor.shape[1] != 1 and tensor.stride(1) != 1:
        return False
    expected = tensor.shape[1]
    for dim in reversed([dim for dim in range(tensor.dim()) if dim != 1]):
        if tensor.shape[dim] != 1 and tensor.stride(dim) != expected:
            return False
        expected *= tensor.shape[dim]
    return True


def _layout(tensor: torch.Tensor) -> tuple[int, int, int] | None:
    channels = tensor.shape[1]
    if tensor.is_contiguous():
        return tensor.shape[0], channels, math.prod(tensor.shape[2:])
    if _channels_innermost(tensor):
        return (tensor.numel() // channels if channels else 0), channels, 1
    return None


def operand(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(the tensor the kernels read, its (outer, channels, inner)): ``tensor`` itself when it
    is contiguous or has its channels innermost, else a copy in the format it suggests."""
    layout = _layout(tensor)
    if layout is not None:
        return tensor, layout
    for memory_format in (torch.channels_last, torch.channels_last_3d, torch.contiguous_format):
        try:
            copy = tensor.contiguous(memory_format=memory_format)
        except RuntimeError:  # a channels-last format of another rank
            continue
        layout = _layout(copy)
        if layout is not None and (memory_format == torch.contiguous_format or layout[2] == 1):
            return copy, layout
    raise AssertionError("a contiguous copy always has a layout")


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_values(tensor: torch.Tensor | None, channels: int, fill: float, like: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    if tensor is None:
        return torch.full((channels,), fill, dtype=dtype, device=like.device)
    return tensor.to(dtype)


def _output_for(result: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Where a kernel writes a result like ``source`` (its operand): ``result`` itself when
    the strides agree, else a scratch tensor copied into ``result`` afterwards."""
    return result if result.stride() == source.stride() else torch.empty_like(source)


def _forward_into(source: torch.Tensor, layout: tuple[int, int, int], output: torch.Tensor,
                  running_mean: torch.Tensor | None, running_var: torch.Tensor | None, weight: torch.Tensor | None,
                  bias: torch.Tensor | None, training: bool, momentum: float, eps: float,
                  negative_slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    outer, channels, inner = layout
    count = outer * inner
    accumulator = _accumulator(source.dtype)
    if training:
        mean = torch.zeros(channels, dtype=accumulator, device=source.device)
        m2 = torch.zeros(channels, dtype=accumulator, device=source.device)
        if count:
            blocks = triton.cdiv(count, REDUCTION_BLOCK)
            block_mean = torch.empty((channels, blocks), dtype=accumulator, device=source.device)
            block_m2 = torch.empty_like(block_mean)
            block_moments_kernel[(blocks, channels)](source, block_mean, block_m2, count, channels, inner,
                                                     BLOCK=REDUCTION_BLOCK)
            merge_moments_kernel[(channels,)](block_mean, block_m2, mean, m2, blocks, count,
                                              REDUCTION=REDUCTION_BLOCK, BLOCK=MERGE_BLOCK)
            if running_mean is not None:
                # torch's update: the running variance takes the unbiased batch variance.
                running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.to(accumulator))
                running_var.copy_(momentum * (m2 / (count - 1)) + (1 - momentum) * running_var.to(accumulator))
        invstd = 1 / torch.sqrt(m2 / max(count, 1) + eps)
    else:
        mean = running_mean.to(accumulator, copy=True)
        invstd = 1 / torch.sqrt(running_var.to(accumulator) + eps)
    scale = _channel_values(weight, channels, 1.0, source, accumulator) * invstd
    shift = _channel_values(bias, channels, 0.0, source, accumulator) - mean * scale
    numel = source.numel()
    if numel:
        normalize_activate_kernel[flat_grid(numel)](source, output, scale, shift, numel, channels, inner,
                                                    negative_slope)
    return mean, invstd


def batch_norm_leaky_relu_forward(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                  negative_slope):
    """input (N, C, *), per-channel tensors (C,) or None: (output in input's strides, mean, invstd)."""
    source, layout = operand(input)
    result = torch.empty_like(input)
    output = _output_for(result, source)
    mean, invstd = _forward_into(source, layout, output, running_mean, running_var, weight, bias, training, momentum,
                                 eps, negative_slope)
    if output is not result:
        result.copy_(output)
    return result, mean, invstd


def batch_norm_leaky_relu_forward_(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                   negative_slope):
    """The same, writing the output over ``input``: returns (mean, invstd)."""
    source, layout = operand(input)
    statistics = _forward_into(source, layout, source, running_mean, running_var, weight, bias, training, momentum,
                               eps, negative_slope)
    if source is not input:
        input.copy_(source)
    return statistics


def _backward_into(grad, source, layout, grad_input, from_output, mean, invstd, weight, bias, training,
                   negative_slope):
    """Both backward passes; grad and grad_input (which may be grad) have source's strides.
    Returns (grad_weight, grad_bias)."""
    outer, channels, inner = layout
    accumulator = _accumulator(source.dtype)
    count = outer * inner
    weights = _channel_values(weight, channels, 1.0, source, accumulator)
    biases = _channel_values(bias, channels, 0.0, source, accumulator)
    scale = weights * invstd
    shift = biases - mean * scale
    if from_output:
        value_scale = 1 / weights
        value_shift = -biases * value_scale
    else:
        value_scale = invstd
        value_shift = -mean * invstd
    slope = float(negative_slope)
    inverse_slope = 1 / slope if from_output else 0.0
    sum_g = torch.zeros(channels, dtype=accumulator, device=source.device)
    sum_gx = torch.zeros(channels, dtype=accumulator, device=source.device)
    if count:
        blocks = triton.cdiv(count, REDUCTION_BLOCK)
        partial_g = torch.empty((channels, blocks), dtype=accumulator, device=source.device)
        partial_gx = torch.empty_like(partial_g)
        block_gradient_sums_kernel[(blocks, channels)](
            grad, source, scale, shift, value_scale, value_shift, partial_g, partial_gx, count, channels, inner, slope,
            inverse_slope, FROM_OUTPUT=from_output, BLOCK=REDUCTION_BLOCK)
        for partial, total in ((partial_g, sum_g), (partial_gx, sum_gx)):
            _leaky_relu.channel_sum_kernel[(channels,)](partial, total, blocks, BLOCK=_leaky_relu.CHANNEL_SUM_BLOCK)
    k = weights * invstd
    if training and count:
        k0 = -(sum_g / count) * k
        k1 = -(sum_gx / count) * k
        p, q = value_scale * k1, value_shift * k1 + k0
    else:
        p, q = torch.zeros_like(k), torch.zeros_like(k)
    numel = source.numel()
    if numel:
        input_gradient_kernel[flat_grid(numel)](grad, source, grad_input, scale, shift, k, p, q, numel, channels,
                                                inner, slope, inverse_slope, FROM_OUTPUT=from_output)
    parameter_dtype = weight.dtype if weight is not None else accumulator
    return sum_gx.to(parameter_dtype), sum_g.to(parameter_dtype)


def batch_norm_leaky_relu_backward(grad_output, input, output, mean, invstd, weight, bias, training, negative_slope):
    """(grad_input, grad_weight, grad_bias), x_hat read from ``input`` or recovered from ``output``."""
    saved = output if output is not None else input
    source, layout = operand(saved)
    grad = grad_output if grad_output.stride() == source.stride() else torch.empty_like(source).copy_(grad_output)
    result = torch.empty_like(saved)
    grad_input = _output_for(result, source)
    gradients = _backward_into(grad, source, layout, grad_input, output is not None, mean, invstd, weight, bias,
                               training, negative_slope)
    if grad_input is not result:
        result.copy_(grad_input)
    return result, *gradients


def batch_norm_leaky_relu_backward_(grad_output, input, output, mean, invstd, weight, bias, training,
                                    negative_slope):
    """The same writing grad_input over grad_output (the saved tensor's strides, checked by
    the C++ entry): returns (grad_weight, grad_bias)."""
    saved = output if output is not None else input
    source, layout = operand(saved)
    return _backward_into(grad_output, source, layout, grad_output, output is not None, mean, invstd, weight, bias,
                          training, negative_slope)


# The launchers, by the name of the op they implement (imggen_fast/ops/_registration.py).
LAUNCHERS = {
    "batch_norm_leaky_relu_forward": batch_norm_leaky_relu_forward,
    "batch_norm_leaky_relu_forward_": batch_norm_leaky_relu_forward_,
    "batch_norm_leaky_relu_backward": batch_norm_leaky_relu_backward,
    "batch_norm_leaky_relu_backward_": batch_norm_leaky_relu_backward_,
}
