// CUDA kernels of the LeakyReLU epilogue, on the current stream, run after cuDNN's or
// cuBLAS's layer (through ATen): the forward bias + LeakyReLU in place, the backward
// mask, and the backward mask with a deterministic bias-gradient reduction (per-chunk
// partials, then each channel's partials in a fixed order; no atomics). The element
// math is csrc/leaky_relu.h, shared with the CPU kernels.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/WrapDimMinimal.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../backend.h"
#include "../leaky_relu.h"
#include "cuda_utils.h"

namespace imggen_fast::cuda {
namespace {

template <typename scalar_t>
__global__ void leaky_relu_backward_from_output_kernel(const scalar_t* __restrict__ grad_output,
                                                       const scalar_t* __restrict__ output,
                                                       scalar_t* __restrict__ grad_input,
                                                       int64_t numel,
                                                       at::opmath_type<scalar_t> negative_slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    grad_input[i] = static_cast<scalar_t>(math::leaky_relu_backward_from_output<acc_t>(
        static_cast<acc_t>(grad_output[i]), static_cast<acc_t>(output[i]), negative_slope));
  }
}

at::Tensor leaky_relu_backward_from_output(const at::Tensor& grad_output, const at::Tensor& output,
                                           double negative_slope) {
  if (triton_chosen()) {
    return call_triton<decltype(leaky_relu_backward_from_output)>("leaky_relu_backward_from_output", grad_output, output, negative_slope);
  }
  check_same_shape_and_dtype("leaky_relu_backward_from_output", grad_output, "grad_output", output,
                             "output");
  const c10::cuda::CUDAGuard device_guard(output.device());
  const at::Tensor output_dense = dense(output);
  const at::Tensor grad_dense = in_layout_of(grad_output, output_dense);
  at::Tensor grad_input = at::empty_like(output_dense);
  const int64_t numel = output_dense.numel();
  if (numel == 0) {
    return grad_input;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, output.scalar_type(), "leaky_relu_backward_from_output", [&] {
        leaky_relu_backward_from_output_kernel<scalar_t>
            <<<elementwise_blocks(numel), kThreadsPerBlock, 0, stream>>>(
                grad_dense.const_data_ptr<scalar_t>(), output_dense.const_data_ptr<scalar_t>(),
                grad_input.mutable_data_ptr<scalar_t>(), numel,
                static_cast<at::opmath_type<scalar_t>>(negative_slope));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad_input;
}


// index_t: int32_t when the tensor has fewer than 2**31 elements, so that the channel of
// each element costs a 32-bit divide and modulo, not a 64-bit one (many times slower on
// GPUs); int64_t otherwise. inner == 1 (channels_last, Linear) needs the modulo alone.
template <typename scalar_t, typename index_t>
__global__ void bias_leaky_relu_kernel(scalar_t* __restrict__ output, const scalar_t* __restrict__ bias,
                                       index_t numel, index_t channels, index_t inner,
                                       at::opmath_type<scalar_t> negative_slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    acc_t value = static_cast<acc_t>(output[i]);
    if (bias != nullptr) {
      value += static_cast<acc_t>(bias[(inner == 1 ? i : i / inner) % channels]);
    }
    output[i] = static_cast<scalar_t>(math::leaky_relu_forward<acc_t>(value, negative_slope));
  }
}

// True when every index of a tensor of `numel` elements, and the grid-stride loop's
// last step past it, fit in 32 bits.
inline bool fits_int32(int64_t numel) {
  return numel + static_cast<int64_t>(kThreadsPerBlock) * elementwise_blocks(numel) < (int64_t{1} << 31);
}

void bias_leaky_relu_(const at::Tensor& output, const std::optional<at::Tensor>& bias, double negative_slope,
                      int64_t channel_dim) {
  if (triton_chosen()) {
    call_triton<decltype(bias_leaky_relu_)>("bias_leaky_relu_", output, bias, negative_slope, channel_dim);
    return;
  }
  channel_dim = c10::maybe_wrap_dim(channel_dim, output.dim());
  const auto layout = channel_layout(output, channel_dim);
  TORCH_CHECK(layout.has_value(), "bias_leaky_relu_: output must be contiguous or channels_last");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == layout->channels && bias->scalar_type() == output.scalar_type() &&
                    bias->device() == output.device(),
                "bias_leaky_relu_: bias must be a (", layout->channels, ") tensor of output's dtype on output's device");
  }
  // The kernel reads the bias as a dense vector: a strided, expanded or offset view is
  // copied (C elements) rather than read past its end.
  const at::Tensor bias_dense = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t numel = output.numel();
  if (numel == 0) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(output.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, output.scalar_type(), "bias_leaky_relu_", [&] {
    const auto launch = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      bias_leaky_relu_kernel<scalar_t, index_t><<<elementwise_blocks(numel), kThreadsPerBlock, 0, stream>>>(
          output.mutable_data_ptr<scalar_t>(), has_bias ? bias_dense.const_data_ptr<scalar_t>() : nullptr,
          static_cast<index_t>(numel), static_cast<index_t>(layout->channels), static_cast<index_t>(layout->inner),
          static_cast<at::opmath_type<scalar_t>>(negative_slope));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (fits_int32(numel)) {
      launch(int32_t{0});
    } else {
      launch(int64_t{0});
    }
  });
}

// The bias-gradient reductions: per block, the masked gradient of a fixed set of elements
// summed in a fixed order into one partial sum per channel, then each channel's partial
// sums added in order by channel_sum_kernel. Fixed sizes, so the partial sums and the
// result's bits depend on the shape alone. No atomics. Blocks are numbered along the
// grid's x axis only (its y extent, 65,535, would cap the channels).
//
// inner > 1 (contiguous NCHW): a channel's elements lie in runs of `inner`; one block
// sweeps kReductionChunk of them. inner == 1 (channels_last, Linear): the tensor is a
// (rows, channels) matrix; one block takes a tile of kTileChannels channels by
// kTileRows rows, each warp reading whole 32-channel rows (coalesced), and sums each
// channel's column over its rows.
constexpr int64_t kReductionChunk = 4096;
constexpr int kTileChannels = 32;
constexpr int kTileRowLanes = kThreadsPerBlock / kTileChannels;
constexpr int64_t kTileRows = 256;

// Sums `value` over the block in a fixed tree order; thread 0 gets the total.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value, acc_t* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (unsigned int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      shared[threadIdx.x] += shared[threadIdx.x + half];
    }
    __syncthreads();
  }
  return shared[0];
}

// inner > 1. Block b: channel b / chunks, chunk b % chunks of the channel's outer * inner
// elements; its sum goes to partials[b] = partials[channel, chunk]. index_t: int32_t when
// the tensor's indices fit (32-bit divide and modulo per element), else int64_t.
template <typename scalar_t, typename index_t>
__global__ void bias_leaky_relu_backward_kernel(const scalar_t* grad_output,  // may alias grad_input
                                                const scalar_t* __restrict__ output, scalar_t* grad_input,
                                                at::opmath_type<scalar_t>* __restrict__ partials, index_t outer,
                                                index_t channels, index_t inner, index_t chunks,
                                                at::opmath_type<scalar_t> negative_slope) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[kThreadsPerBlock];
  const index_t channel = static_cast<index_t>(blockIdx.x / chunks);
  const index_t chunk_start = static_cast<index_t>(blockIdx.x % chunks) * static_cast<index_t>(kReductionChunk);
  const index_t count = outer * inner;
  const index_t chunk_end =
      count - chunk_start < kReductionChunk ? count : static_cast<index_t>(chunk_start + kReductionChunk);
  acc_t sum = 0;
  for (index_t j = chunk_start + threadIdx.x; j < chunk_end; j += blockDim.x) {
    const index_t index = (j / inner) * channels * inner + channel * inner + j % inner;
    const acc_t value = math::leaky_relu_backward_from_output<acc_t>(
        static_cast<acc_t>(grad_output[index]), static_cast<acc_t>(output[index]), negative_slope);
    grad_input[index] = static_cast<scalar_t>(value);
    sum += value;
  }
  const acc_t total = block_sum(sum, shared);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = total;
  }
}

// inner == 1. Block b: channel tile b % tiles (channels [32 t, 32 t + 32)), row chunk
// b / tiles (rows [kTileRows c, kTileRows (c + 1))). Thread (lane, row lane) walks rows
// row_lane, row_lane + 8, ... of the chunk in order at channel 32 t + lane; the eight row
// lanes' sums of a channel are then added in order. The sum goes to
// partials[channel, chunk]. 32-bit tile and row counts; 64-bit element offsets.
template <typename scalar_t>
__global__ void bias_gradient_rows_kernel(const scalar_t* grad_output,  // may alias grad_input
                                          const scalar_t* __restrict__ output, scalar_t* grad_input,
                                          at::opmath_type<scalar_t>* __restrict__ partials, int64_t rows,
                                          int64_t channels, unsigned int tiles, unsigned int row_chunks,
                                          at::opmath_type<scalar_t> negative_slope) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[kTileRowLanes][kTileChannels];
  const unsigned int lane = threadIdx.x % kTileChannels;
  const unsigned int row_lane = threadIdx.x / kTileChannels;
  const unsigned int tile = blockIdx.x % tiles;
  const unsigned int row_chunk = blockIdx.x / tiles;
  const int64_t channel = static_cast<int64_t>(tile) * kTileChannels + lane;
  const int64_t row_end = rows - static_cast<int64_t>(row_chunk) * kTileRows < kTileRows
                              ? rows
                              : static_cast<int64_t>(row_chunk + 1) * kTileRows;
  acc_t sum = 0;
  if (channel < channels) {
    for (int64_t row = static_cast<int64_t>(row_chunk) * kTileRows + row_lane; row < row_end; row += kTileRowLanes) {
      const int64_t index = row * channels + channel;
      const acc_t value = math::leaky_relu_backward_from_output<acc_t>(
          static_cast<acc_t>(grad_output[index]), static_cast<acc_t>(output[index]), negative_slope);
      grad_input[index] = static_cast<scalar_t>(value);
      sum += value;
    }
  }
  shared[row_lane][lane] = sum;
  __syncthreads();
  if (row_lane == 0 && channel < channels) {
    acc_t total = 0;
    for (int k = 0; k < kTileRowLanes; ++k) {
      total += shared[k][lane];
    }
    partials[channel * row_chunks + row_chunk] = total;
  }
}

// One block per channel: grad_bias[channel] = sum of its partials, in a fixed order.
template <typename scalar_t>
__global__ void channel_sum_kernel(const at::opmath_type<scalar_t>* __restrict__ partials,
                                   scalar_t* __restrict__ grad_bias, int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[kThreadsPerBlock];
  const int64_t channel = blockIdx.x;
  acc_t sum = 0;
  for (int64_t k = threadIdx.x; k < chunks; k += blockDim.x) {
    sum += partials[channel * chunks + k];
  }
  const acc_t total = block_sum(sum, shared);
  if (threadIdx.x == 0) {
    grad_bias[channel] = static_cast<scalar_t>(total);
  }
}

// Writes the mask of grad_dense into grad_input (which may be grad_dense itself) and
// returns the bias gradient. output_dense has a channel_layout; grad_dense and
// grad_input have its strides.
at::Tensor mask_and_bias_gradient(const at::Tensor& grad_dense, const at::Tensor& output_dense,
                                  const at::Tensor& grad_input, double negative_slope, int64_t channel_dim) {
  const auto [outer, channels, inner] = *channel_layout(output_dense, channel_dim);
  at::Tensor grad_bias = at::empty({channels}, output_dense.options());
  if (output_dense.numel() == 0) {
    return grad_bias.zero_();
  }
  const bool rows = inner == 1;
  // Partial sums per channel, and blocks of the first pass (all along the grid's x axis).
  const int64_t chunks =
      rows ? (outer + kTileRows - 1) / kTileRows : (outer * inner + kReductionChunk - 1) / kReductionChunk;
  const int64_t tiles = (channels + kTileChannels - 1) / kTileChannels;
  const int64_t blocks = rows ? tiles * chunks : channels * chunks;
  TORCH_CHECK(blocks < (int64_t{1} << 31) && channels < (int64_t{1} << 31),
              "bias_leaky_relu_backward: tensor too large for the CUDA grid (", channels, " channels of ",
              outer * inner, " elements)");
  const auto acc_dtype = output_dense.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partials = at::empty({channels, chunks}, output_dense.options().dtype(acc_dtype));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, output_dense.scalar_type(), "bias_leaky_relu_backward",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto grid = static_cast<unsigned int>(blocks);
    if (rows) {
      bias_gradient_rows_kernel<scalar_t><<<grid, kThreadsPerBlock, 0, stream>>>(
          grad_dense.const_data_ptr<scalar_t>(), output_dense.const_data_ptr<scalar_t>(),
          grad_input.mutable_data_ptr<scalar_t>(), partials.mutable_data_ptr<acc_t>(), outer, channels,
          static_cast<unsigned int>(tiles), static_cast<unsigned int>(chunks), static_cast<acc_t>(negative_slope));
    } else {
      const auto launch = [&](auto index_zero) {
        using index_t = decltype(index_zero);
        bias_leaky_relu_backward_kernel<scalar_t, index_t><<<grid, kThreadsPerBlock, 0, stream>>>(
            grad_dense.const_data_ptr<scalar_t>(), output_dense.const_data_ptr<scalar_t>(),
            grad_input.mutable_data_ptr<scalar_t>(), partials.mutable_data_ptr<acc_t>(), static_cast<index_t>(outer),
            static_cast<index_t>(channels), static_cast<index_t>(inner), static_cast<index_t>(chunks),
            static_cast<acc_t>(negative_slope));
      };
      // The last chunk's loop index may pass the tensor's end by a block.
      if (output_dense.numel() + kReductionChunk < (int64_t{1} << 31)) {
        launch(int32_t{0});
      } else {
        launch(int64_t{0});
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    channel_sum_kernel<scalar_t><<<static_cast<unsigned int>(channels), kThreadsPerBlock, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), grad_bias.mutable_data_ptr<scalar_t>(), chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_bias;
}

std::tuple<at::Tensor, at::Tensor> bias_leaky_relu_backward(const at::Tensor& grad_output,
                                                            const at::Tensor& output, double negative_slope,
                                                            int64_t channel_dim) {
  if (triton_chosen()) {
    return call_triton<decltype(bias_leaky_relu_backward)>("bias_leaky_relu_backward", grad_output, output, negative_slope, channel_dim);
  }
  const c10::cuda::CUDAGuard device_guard(output.device());
  const MaskSweepOperands operands = mask_sweep_operands("bias_leaky_relu_backward", grad_output, output, channel_dim);
  at::Tensor grad_bias = mask_and_bias_gradient(operands.grad_output, operands.output, operands.grad_input,
                                                negative_slope, operands.channel_dim);
  return {operands.grad_input, grad_bias};
}

at::Tensor bias_leaky_relu_backward_(const at::Tensor& grad_output, const at::Tensor& output, double negative_slope,
                                     int64_t channel_dim) {
  if (triton_chosen()) {
    return call_triton<decltype(bias_leaky_relu_backward_)>("bias_leaky_relu_backward_", grad_output, output, negative_slope, channel_dim);
  }
  check_same_shape_and_dtype("bias_leaky_relu_backward_", grad_output, "grad_output", output, "output");
  channel_dim = c10::maybe_wrap_dim(channel_dim, output.dim());
  check_in_place_operand(grad_output, output, channel_dim);
  const c10::cuda::CUDAGuard device_guard(output.device());
  return mask_and_bias_gradient(grad_output, output, grad_output, negative_slope, channel_dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(imggen_fast, CUDA, m) {
  m.impl("leaky_relu_backward_from_output", &leaky_relu_backward_from_output);
  m.impl("bias_leaky_relu_", &bias_leaky_relu_);
  m.impl("bias_leaky_relu_backward", &bias_leaky_relu_backward);
  m.impl("bias_leaky_relu_backward_", &bias_leaky_relu_backward_);
}

}  // namespace imggen_fast::cuda
