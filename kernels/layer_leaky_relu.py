"""Triton kernels of the fused layers (see imggen_fast/ops/layer_leaky_relu.py).

``convolution_leaky_relu_kernel``: an implicit-GEMM convolution, plain or transposed,
with bias + LeakyReLU fused into its store. The GEMM is M = N * H_out * W_out output
pixels by N_gemm = C_out channels, over K = C_in * kH * kW taps; the input patch of a
tap is gathered on the fly (no im2col buffer):

* Conv2d: ``ih = oh * stride - padding + kh * dilation``, weight (C_out, C_in, kH, kW).
* ConvTranspose2d: ``ih = (oh + padding - kh * dilation) / stride`` where that division
  is exact, weight (C_in, C_out, kH, kW).

Inputs and outputs are addressed through their strides, so NCHW and channels_last
both work without a copy, and the output keeps the input's memory format.
groups == 1 only (the ops layer sends other calls to the reference). fp32 products
use IEEE precision (not TF32), so results match the eager reference.

These serve only when the Triton backend is chosen by name; otherwise (and always for
Linear) the layers run ATen's GEMM followed by the epilogue kernel of kernels/leaky_relu.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import autotune, product_int64

# Tiles the real compiler fits in registers on sm_80 and sm_90 in every variant the
# launcher produces (no spills, checked by tests/test_triton_compile.py). 64 x 64 x 32
# with 4 warps and any num_stages > 1 spilled, and so did every 32-row tile tried (2, 4
# or 8 warps) in the transposed variants with unit strides and paddings. The gathered
# tiles are loaded by pointer, so software pipelining buys little.
CONVOLUTION_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=8, num_stages=1),
]


# A CUDA grid's y extent: the blocks of output channels.
MAX_GRID_Y = 65535


@autotune(configs=CONVOLUTION_CONFIGS, key=["batch", "in_channels", "out_channels", "out_height", "out_width",
                                            "kernel_height", "kernel_width", "TRANSPOSED"])
@triton.jit
def convolution_leaky_relu_kernel(
        input_ptr, weight_ptr, bias_ptr, output_ptr,
        batch, in_channels, in_height, in_width, out_channels, out_height, out_width,
        kernel_height, kernel_width, stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w,
        input_stride_n, input_stride_c, input_stride_h, input_stride_w,
        weight_stride_in, weight_stride_out, weight_stride_h, weight_stride_w,
        output_stride_n, output_stride_c, output_stride_h, output_stride_w,
        negative_slope,
        HAS_BIAS: tl.constexpr, TRANSPOSED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Rows: output pixels (n, oh, ow); columns: output channels. The K loop runs over the
    # kernel taps, then over input channels in blocks: a tap's input position depends
    # on the row alone, so the gathered tile needs only 1-D index vectors.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    columns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < product_int64(batch, out_height) * out_width  # 64-bit: may pass 2**31
    column_valid = columns < out_channels
    n = rows // (out_height * out_width)
    pixel = (rows % (out_height * out_width)).to(tl.int32)
    oh = pixel // out_width
    ow = pixel % out_width
    input_rows = input_ptr + n * input_stride_n  # 64-bit: the batch offset may exceed 2**31
    channel_offsets = tl.arange(0, BLOCK_K)
    accumulator = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kh in range(0, kernel_height):
        for kw in range(0, kernel_width):
            if TRANSPOSED:
                numerator_h = oh + padding_h - kh * dilation_h
                numerator_w = ow + padding_w - kw * dilation_w
                ih = numerator_h // stride_h
                iw = numerator_w // stride_w
                tap_valid = ((numerator_h >= 0) & (numerator_w >= 0) & (numerator_h % stride_h == 0)
                             & (numerator_w % stride_w == 0) & (ih < in_height) & (iw < in_width))
            else:
                ih = oh * stride_h - padding_h + kh * dilation_h
                iw = ow * stride_w - padding_w + kw * dilation_w
                tap_valid = (ih >= 0) & (iw >= 0) & (ih < in_height) & (iw < in_width)
            patch_rows = input_rows + ih * input_stride_h + iw * input_stride_w
            row_mask = row_valid & tap_valid
            weight_tap = weight_ptr + kh * weight_stride_h + kw * weight_stride_w
            for channel_start in range(0, in_channels, BLOCK_K):
                channels = channel_start + channel_offsets
                channel_valid = channels < in_channels
                patch = tl.load(patch_rows[:, None] + channels[None, :] * input_stride_c,
                                mask=row_mask[:, None] & channel_valid[None, :], other=0.0)
                if TRANSPOSED:
                    weight_offsets = channels[:, None] * weight_stride_in + columns[None, :] * weight_stride_out
                else:
                    weight_offsets = columns[None, :] * weight_stride_in + channels[:, None] * weight_stride_out
                weights = tl.load(weight_tap + weight_offsets, mask=channel_valid[:, None] & column_valid[None, :],
                                  other=0.0)
                accumulator = tl.dot(patch, weights, accumulator, input_precision="ieee")
    if HAS_BIAS:
        accumulator += tl.load(bias_ptr + columns, mask=column_valid, other=0.0).to(tl.float32)[None, :]
    accumulator = tl.where(accumulator > 0, accumulator, accumulator * negative_slope)
    output_offsets = (n[:, None] * output_stride_n + columns[None, :] * output_stride_c
                      + oh[:, None] * output_stride_h + ow[:, None] * output_stride_w)
    tl.store(output_ptr + output_offsets, accumulator.to(output_ptr.dtype.element_ty),
             mask=row_valid[:, None] & column_valid[None, :])


def _convolution(input, weight, bias, stride, padding, dilation, output_padding, negative_slope, transposed):
    batch, in_channels, in_height, in_width = input.shape
    out_channels = weight.shape[1] if transposed else weight.shape[0]
    kernel_height, kernel_width = weight.shape[2], weight.shape[3]
    if transposed:
        out_height = ((in_height - 1) * stride[0] - 2 * padding[0] + dilation[0] * (kernel_height - 1)
                      + output_padding[0] + 1)
        out_width = ((in_width - 1) * stride[1] - 2 * padding[1] + dilation[1] * (kernel_width - 1)
                     + output_padding[1] + 1)
    else:
        out_height = (in_height + 2 * padding[0] - dilation[0] * (kernel_height - 1) - 1) // stride[0] + 1
        out_width = (in_width + 2 * padding[1] - dilation[1] * (kernel_width - 1) - 1) // stride[1] + 1
    # ATen's rule: channels_last out when the input or the weight is channels_last.
    channels_last = any(not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last)
                        for tensor in (input, weight))
    output = torch.empty((batch, out_channels, out_height, out_width), dtype=input.dtype, device=input.device,
                         memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if output.numel() == 0:
        return output
    column_blocks = triton.cdiv(out_channels, min(config.kwargs["BLOCK_N"] for config in CONVOLUTION_CONFIGS))
    if column_blocks > MAX_GRID_Y:
        raise ValueError(f"conv_leaky_relu: {out_channels} output channels need {column_blocks} blocks of columns, "
                         f"more than a CUDA grid's y extent ({MAX_GRID_Y})")
    sizes = (batch, in_channels, in_height, in_width, out_channels, out_height, out_width,
             kernel_height, kernel_width, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
             *input.stride(), *weight.stride(), *output.stride())
    if max(sizes) >= 2**31:
        raise ValueError("conv_leaky_relu: the Triton convolution takes sizes and strides below 2**31 (its index "
                         f"math is 32-bit within a sample); got {max(sizes)}")
    grid = lambda meta: (triton.cdiv(batch * out_height * out_width, meta["BLOCK_M"]),  # noqa: E731
                         triton.cdiv(out_channels, meta["BLOCK_N"]))
    convolution_leaky_relu_kernel[grid](input, weight, output if bias is None else bias.contiguous(), output, *sizes,
                                        negative_slope, HAS_BIAS=bias is not None, TRANSPOSED=transposed)
    return output


def conv_transpose2d_leaky_relu(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                stride: list[int], padding: list[int], output_padding: list[int], groups: int,
                                dilation: list[int], negative_slope: float) -> torch.Tensor:
    """input (N, C_in, H, W), weight (C_in, C_out, kH, kW), groups == 1 -> (N, C_out, H_out, W_out)."""
    return _convolution(input, weight, bias, stride, padding, dilation, output_padding, negative_slope, True)


def conv2d_leaky_relu(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
                      padding: list[int], dilation: list[int], groups: int, negative_slope: float) -> torch.Tensor:
    """input (N, C_in, H, W), weight (C_out, C_in, kH, kW), groups == 1 -> (N, C_out, H_out, W_out)."""
    return _convolution(input, weight, bias, stride, padding, dilation, [0, 0], negative_slope, False)


# The launchers, by the name of the op they implement (imggen_fast/ops/_registration.py).
LAUNCHERS = {"conv_transpose2d_leaky_relu": conv_transpose2d_leaky_relu, "conv2d_leaky_relu": conv2d_leaky_relu}
# The implicit-GEMM convolution serves only when the Triton backend is named: by default
# the layers run cuDNN through ATen with the epilogue after it.
ONLY_WHEN_CHOSEN = frozenset(LAUNCHERS)

# Kernels whose launcher keeps every integer argument below 2**31 (it checks), so that
# Triton always types them i32: the ahead-of-time compile test widens no argument of theirs.
NARROW_INTEGERS = frozenset({"convolution_leaky_relu_kernel"})
