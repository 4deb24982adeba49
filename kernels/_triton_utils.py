"""Helpers shared by the Triton kernel modules: autotuning that also works in
Triton's interpreter, 64-bit size products, and dense-layout handling (the Python twin
of ``csrc/layout.h``)."""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when kernels run in Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _benchmark(kernel_call, quantiles):
    # The interpreter has no GPU timer: report equal times, so the first config runs.
    if interpreting():
        return [0.0] * len(quantiles)
    from triton.testing import do_bench

    return do_bench(kernel_call, quantiles=quantiles)


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    """``triton.autotune`` whose benchmarking step also works under the interpreter."""
    return triton.autotune(configs=configs, key=key, do_bench=_benchmark, **kwargs)


@triton.jit
def product_int64(first, second):
    """``first * second`` in 64 bits. Triton types an integer argument below 2**31 as i32
    (and one equal to 1 as a constant, which has no ``.to``), so the product of two sizes
    would wrap past 2**31 without the cast."""
    return tl.cast(first, tl.int64) * second


def is_dense(tensor: torch.Tensor) -> bool:
    """True for contiguous and channels_last tensors: a flat sweep over ``numel()``
    elements from ``data_ptr()`` visits each element once."""
    return tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last))


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` if it is dense, else a copy (channels_last if its channels are
    innermost, as in a gapped view of a channels_last tensor, else contiguous)."""
    if is_dense(tensor):
        return tensor
    channels_innermost = tensor.dim() == 4 and tensor.size(1) > 1 and tensor.stride(1) == 1
    return tensor.contiguous(memory_format=torch.channels_last if channels_innermost else torch.contiguous_format)


def in_layout_of(tensor: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the strides of the dense tensor ``layout``: as is when they match, else copied once."""
    if tensor.stride() == layout.stride() and is_dense(tensor):
        return tensor
    return torch.empty_like(layout).copy_(tensor)


def channel_layout(tensor: torch.Tensor, channel_dim: int) -> tuple[int, int, int] | None:
    """(outer, channels, inner) of a tensor seen around its channel dim, element (o, c, i)
    at o * channels * inner + c * inner + i: contiguous tensors, and channels_last 4-D
    tensors with channel dim 1 (inner = 1). None for other layouts."""
    channel_dim %= tensor.dim()
    channels = tensor.shape[channel_dim]
    if tensor.is_contiguous():
        outer = math.prod(tensor.shape[:channel_dim])
        return outer, channels, math.prod(tensor.shape[channel_dim + 1:])
    if tensor.dim() == 4 and channel_dim == 1 and tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor.shape[0] * tensor.shape[2] * tensor.shape[3], channels, 1
    return None


def flat_grid(numel: int):
    """Grid of one program per ``BLOCK`` elements."""
    return lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)


# One program per block of this many elements, 4 or 8 warps: the usual
# choices for a memory-bound elementwise sweep.
ELEMENTWISE_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 4096}, num_warps=8),
]
