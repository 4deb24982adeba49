"""Triton kernels of the LeakyReLU epilogue (see imggen_fast/ops/leaky_relu.py).

* ``leaky_relu_backward_from_output``: ``grad_input = grad_output * (output > 0 ? 1 : slope)``,
  the mask read from the activated output (valid for slope >= 0), one sweep.
* ``bias_leaky_relu_``: ``output = leaky_relu(output + bias)`` in place.
* ``bias_leaky_relu_backward``: the same mask, and the bias gradient summed from the
  same sweep: partial sums per channel and block (a 2-D tile of rows by channels where
  the channels are innermost), then each channel's partials in a fixed order
  (deterministic, no atomics).

Tensors are seen as (outer, channels, inner) around the channel dim (contiguous or
channels_last), element (o, c, i) at o * channels * inner + c * inner + i."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import (ELEMENTWISE_CONFIGS, autotune, channel_layout, dense, flat_grid,
                            in_layout_of, product_int64)


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


def leaky_relu_backward_from_output(grad_output: torch.Tensor, output: torch.Tensor,
                                    negative_slope: float) -> torch.Tensor:
    """grad_output, output: the same shape (any); returns grad_input in output's layout."""
    output = dense(output)
    grad_output = in_layout_of(grad_output, output)
    grad_input = torch.empty_like(output)
    numel = output.numel()
    if numel:
        leaky_relu_backward_from_output_kernel[flat_grid(numel)](
            grad_output, output, grad_input, numel, negative_slope)
    return grad_input


@autotune(configs=ELEMENTWISE_CONFIGS, key=["numel"], restore_value=["output_ptr"])
@triton.jit
def bias_leaky_relu_kernel(output_ptr, bias_ptr, numel, channels, inner, negative_slope, HAS_BIAS: tl.constexpr,
                           BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    value = to_accumulator(tl.load(output_ptr + offsets, mask=in_bounds))
    if HAS_BIAS:
        channel = (offsets // inner) % channels
        value += to_accumulator(tl.load(bias_ptr + channel, mask=in_bounds))
    value = tl.where(value > 0, value, value * negative_slope)
    tl.store(output_ptr + offsets, value.to(output_ptr.dtype.element_ty), mask=in_bounds)


def bias_leaky_relu_(output: torch.Tensor, bias: torch.Tensor | None, negative_slope: float,
                     channel_dim: int) -> None:
    """output (*, C, *) contiguous or channels_last, bias (C,) or None: the epilogue in place."""
    layout = channel_layout(output, channel_dim)
    if layout is None:
        raise ValueError("bias_leaky_relu_: output must be contiguous or channels_last")
    _, channels, inner = layout
    numel = output.numel()
    if numel:
        bias_leaky_relu_kernel[flat_grid(numel)](
            output, output if bias is None else bias.contiguous(), numel, channels, inner, negative_slope,
            HAS_BIAS=bias is not None)


# The bias-gradient reduction: each program sums the masked gradient of a fixed set of
# elements into one partial sum per channel, then channel_sum_kernel adds each channel's
# partial sums in order. The sizes are fixed, not autotuned: they decide how the sum is
# split, and so its bits, which must not depend on a timing. Programs are numbered along
# the grid's x axis only: its y extent (65,535) would cap the channels, which a Linear
# with more outputs than that passes.
#
# inner > 1 (contiguous NCHW): one program per (channel, block of REDUCTION_BLOCK of the
# channel's elements). inner == 1 (channels_last, Linear): the tensor is a (rows, channels)
# matrix; one program per tile of TILE_ROWS rows by TILE_CHANNELS channels, whose loads
# are whole row segments, not one element per channel-stride.
REDUCTION_BLOCK = 1024
TILE_ROWS = 64
TILE_CHANNELS = 32
MAX_GRID_X = 2**31 - 1


def bias_gradient_grid(outer: int, channels: int, inner: int) -> tuple[int, int]:
    """(programs, partial sums per channel) of the mask + bias-gradient sweep (see above).
    Raises ValueError when the programs exceed a CUDA grid's x extent."""
    if inner == 1:
        chunks = triton.cdiv(outer, TILE_ROWS)
        programs = chunks * triton.cdiv(channels, TILE_CHANNELS)
    else:
        chunks = triton.cdiv(outer * inner, REDUCTION_BLOCK)
        programs = chunks * channels
    if programs > MAX_GRID_X:
        raise ValueError(f"bias_leaky_relu_backward: {channels} channels of {outer * inner} elements need {programs} "
                         f"programs, more than a CUDA grid holds ({MAX_GRID_X})")
    return programs, chunks


@triton.jit
def bias_leaky_relu_backward_kernel(grad_output_ptr, output_ptr, grad_input_ptr, partial_ptr, outer, channels,
                                    inner, blocks, negative_slope, BLOCK: tl.constexpr):
    """inner > 1. Program p: channel p // blocks, block p % blocks; its partial sum goes to
    partial[p], which is partial[channel, block] of a (channels, blocks) array."""
    program = tl.program_id(0).to(tl.int64)
    channel = program // blocks
    block = program % blocks
    # Index j over the channel's outer * inner elements: (o, i) = divmod(j, inner). The
    # bound in 64 bits: outer and inner arrive as i32 when each is below 2**31, and their
    # product need not be.
    j = block * BLOCK + tl.arange(0, BLOCK)
    in_bounds = j < product_int64(outer, inner)
    offsets = (j // inner) * channels * inner + channel * inner + j % inner
    grad = to_accumulator(tl.load(grad_output_ptr + offsets, mask=in_bounds, other=0))
    output = to_accumulator(tl.load(output_ptr + offsets, mask=in_bounds, other=0))
    grad_input = tl.where(output > 0, grad, grad * negative_slope)
    tl.store(grad_input_ptr + offsets, grad_input.to(grad_input_ptr.dtype.element_ty), mask=in_bounds)
    tl.store(partial_ptr + program, tl.sum(grad_input, axis=0))


@triton.jit
def bias_gradient_rows_kernel(grad_output_ptr, output_ptr, grad_input_ptr, partial_ptr, rows, channels, tiles,
                              chunks, negative_slope, TILE_ROWS: tl.constexpr, TILE_CHANNELS: tl.constexpr):
    """inner == 1. Program p: channel tile p % tiles, row chunk p // tiles; each channel's
    sum over the chunk's rows goes to partial[channel, chunk] of a (channels, chunks) array."""
    program = tl.program_id(0)
    chunk = program // tiles
    row = chunk.to(tl.int64) * TILE_ROWS + tl.arange(0, TILE_ROWS)
    channel = (program % tiles) * TILE_CHANNELS + tl.arange(0, TILE_CHANNELS)
    channel_valid = channel < channels
    in_bounds = (row < rows)[:, None] & channel_valid[None, :]
    offsets = row[:, None] * channels + channel[None, :]
    grad = to_accumulator(tl.load(grad_output_ptr + offsets, mask=in_bounds, other=0))
    output = to_accumulator(tl.load(output_ptr + offsets, mask=in_bounds, other=0))
    grad_input = tl.where(output > 0, grad, grad * negative_slope)
    tl.store(grad_input_ptr + offsets, grad_input.to(grad_input_ptr.dtype.element_ty), mask=in_bounds)
    tl.store(partial_ptr + channel.to(tl.int64) * chunks + chunk, tl.sum(grad_input, axis=0), mask=channel_valid)


@triton.jit
def channel_sum_kernel(partial_ptr, result_ptr, blocks, BLOCK: tl.constexpr):
    """result[c] = sum of partial[c, :blocks], BLOCK at a time, in a fixed order."""
    channel = tl.program_id(0).to(tl.int64)
    total = tl.zeros([BLOCK], dtype=partial_ptr.dtype.element_ty)
    for start in range(0, blocks, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        total += tl.load(partial_ptr + channel * blocks + offsets, mask=offsets < blocks, other=0)
    tl.store(result_ptr + channel, tl.sum(total, axis=0).to(result_ptr.dtype.element_ty))


CHANNEL_SUM_BLOCK = 256


def bias_leaky_relu_backward(grad_output: torch.Tensor, output: torch.Tensor, negative_slope: float,
                             channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_output, output (*, C, *): (grad_input in output's layout, grad_bias (C,))."""
    output = dense(output)
    if channel_layout(output, channel_dim) is None:
        output = output.contiguous()
    grad_output = in_layout_of(grad_output, output)
    grad_input = torch.empty_like(output)
    return grad_input, _mask_and_bias_gradient(grad_output, output, grad_input, negative_slope, channel_dim)


def bias_leaky_relu_backward_(grad_output: torch.Tensor, output: torch.Tensor, negative_slope: float,
                              channel_dim: int) -> torch.Tensor:
    """The same in place on grad_output, which must have output's dense strides (each element
    is read before it is written, by the same program); returns grad_bias (C,)."""
    if (grad_output.shape != output.shape or grad_output.stride() != output.stride()
            or channel_layout(output, channel_dim) is None):
        raise ValueError("bias_leaky_relu_backward_: grad_output must have output's shape and dense strides")
    return _mask_and_bias_gradient(grad_output, output, grad_output, negative_slope, channel_dim)


def _mask_and_bias_gradient(grad_output: torch.Tensor, output: torch.Tensor, grad_input: torch.Tensor,
                            negative_slope: float, channel_dim: int) -> torch.Tensor:
    """Writes the masked gradient into grad_input (grad_output's strides, which are output's)
    and returns the bias gradient (C,)."""
    outer, channels, inner = channel_layout(output, channel_dim)
    accumulator = torch.float64 if output.dtype == torch.float64 else torch.float32
    grad_bias = torch.empty(channels, dtype=output.dtype, device=output.device)
    if output.numel() == 0:
        return grad_bias.zero_()
    programs, chunks = bias_gradient_grid(outer, channels, inner)
    partials = torch.empty((channels, chunks), dtype=accumulator, device=output.device)
    if inner == 1:
        bias_gradient_rows_kernel[(programs,)](
            grad_output, output, grad_input, partials, outer, channels, triton.cdiv(channels, TILE_CHANNELS), chunks,
            negative_slope, TILE_ROWS=TILE_ROWS, TILE_CHANNELS=TILE_CHANNELS)
    else:
        bias_leaky_relu_backward_kernel[(programs,)](
            grad_output, output, grad_input, partials, outer, channels, inner, chunks, negative_slope,
            BLOCK=REDUCTION_BLOCK)
    channel_sum_kernel[(channels,)](partials, grad_bias, chunks, BLOCK=CHANNEL_SUM_BLOCK)
    return grad_bias


# The launchers, by the name of the op they implement (imggen_fast/ops/_registration.py).
LAUNCHERS = {
    "leaky_relu_backward_from_output": leaky_relu_backward_from_output,
    "bias_leaky_relu_": bias_leaky_relu_,
    "bias_leaky_relu_backward": bias_leaky_relu_backward,
    "bias_leaky_relu_backward_": bias_leaky_relu_backward_,
}
