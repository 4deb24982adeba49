// CUDA kernels of the fused BatchNorm + LeakyReLU, on the current stream (math:
// csrc/batch_norm_leaky_relu.h, shared with the CPU kernels).
//
// Forward: one block per (chunk of kReductionChunk elements, channel) computes the chunk's
// mean and sum of squared deviations (two passes over the chunk, the second from cache);
// one thread per channel merges its chunks in order (Chan's formula) and updates the
// running statistics; one grid-stride pass writes y = leaky_relu(x * scale + shift).
// Backward: the same chunks give sum(g_pre) and sum(g_pre * x_hat); one thread per channel
// adds them in order and forms the coefficients; one grid-stride pass writes grad_x.
// Every reduction has a fixed shape (warp shuffles in a fixed tree, chunks in order): no
// atomics, the same bits on every run.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../backend.h"
#include "../batch_norm_leaky_relu.h"
#include "cuda_utils.h"

namespace imggen_fast::cuda {
namespace {

using namespace batch_norm_leaky_relu;  // the host helpers and entries shared with the CPU kernels

// Elements of one channel per reduction block: fixed, so the partial sums, and the
// results' bits, depend on the shape alone.
constexpr int64_t kReductionChunk = 4096;
constexpr int kWarp = 32;

// The sum of `value` over the block (blockDim.x a multiple of 32, at most 1024) in a fixed
// order, returned to every thread. `warp_totals` holds 32 values in shared memory.
template <typename acc_t>
__device__ acc_t block_total(acc_t value, acc_t* warp_totals) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  if (lane == 0) warp_totals[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < static_cast<int>(blockDim.x / kWarp) ? warp_totals[lane] : acc_t(0);
    for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
    if (lane == 0) warp_totals[0] = value;
  }
  __syncthreads();
  const acc_t total = warp_totals[0];
  __syncthreads();  // warp_totals may be reused at once
  return total;
}

// Memory offset of element j of a channel's count = outer * inner elements.
__device__ __forceinline__ int64_t channel_offset(int64_t j, int64_t channel, int64_t channels, int64_t inner) {
  return (j / inner) * channels * inner + channel * inner + j % inner;
}

struct Chunk {
  int64_t begin;
  int64_t end;
};

__device__ __forceinline__ Chunk chunk_of_block(int64_t count) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kReductionChunk;
  return {begin, begin + kReductionChunk < count ? begin + kReductionChunk : count};
}

// Grid (chunks, channels): the chunk's mean and m2, at [channel, chunk] of the partials.
template <typename scalar_t>
__global__ void block_moments_kernel(const scalar_t* __restrict__ input, at::opmath_type<scalar_t>* __restrict__ mean,
                                     at::opmath_type<scalar_t>* __restrict__ m2, int64_t count, int64_t channels,
                                     int64_t inner) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t warp_totals[kWarp];
  const int64_t channel = blockIdx.y;
  const Chunk chunk = chunk_of_block(count);
  acc_t sum = 0;
  for (int64_t j = chunk.begin + threadIdx.x; j < chunk.end; j += blockDim.x) {
    sum += static_cast<acc_t>(input[channel_offset(j, channel, channels, inner)]);
  }
  const acc_t chunk_mean = block_total(sum, warp_totals) / static_cast<acc_t>(chunk.end - chunk.begin);
  acc_t squares = 0;
  for (int64_t j = chunk.begin + threadIdx.x; j < chunk.end; j += blockDim.x) {
    const acc_t deviation = static_cast<acc_t>(input[channel_offset(j, channel, channels, inner)]) - chunk_mean;
    squares = math::fused_multiply_add(deviation, deviation, squares);
  }
  const acc_t chunk_m2 = block_total(squares, warp_totals);
  if (threadIdx.x == 0) {
    mean[channel * gridDim.x + blockIdx.x] = chunk_mean;
    m2[channel * gridDim.x + blockIdx.x] = chunk_m2;
  }
}

// One thread per channel: the statistics (training: the chunks merged in order, the
// running statistics updated in place; eval: the running statistics), and the forward's
// scale and shift. weight and bias may be null (1 and 0).
template <typename acc_t>
__global__ void channel_statistics_kernel(const acc_t* __restrict__ chunk_mean, const acc_t* __restrict__ chunk_m2,
                                          int64_t chunks, int64_t count, acc_t* running_mean, acc_t* running_var,
                                          const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                          acc_t* __restrict__ mean, acc_t* __restrict__ invstd,
                                          acc_t* __restrict__ scale, acc_t* __restrict__ shift, int64_t channels,
                                          bool training, acc_t momentum, acc_t eps) {
  const int64_t channel = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (channel >= channels) {
    return;
  }
  acc_t channel_mean = 0;
  acc_t channel_invstd = 0;
  if (training) {
    acc_t merged = 0;
    acc_t m2 = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int64_t begin = chunk * kReductionChunk;
      const acc_t elements = static_cast<acc_t>((begin + kReductionChunk < count ? begin + kReductionChunk : count) -
                                                begin);
      math::merge_moments(merged, channel_mean, m2, elements, chunk_mean[channel * chunks + chunk],
                          chunk_m2[channel * chunks + chunk]);
    }
    channel_invstd = math::inverse_std(count > 0 ? m2 / static_cast<acc_t>(count) : acc_t(0), eps);
    if (running_mean != nullptr && count > 0) {
      running_mean[channel] = math::running_update(running_mean[channel], channel_mean, momentum);
      running_var[channel] = math::running_update(running_var[channel], m2 / static_cast<acc_t>(count - 1), momentum);
    }
  } else {
    channel_mean = running_mean[channel];
    channel_invstd = math::inverse_std(running_var[channel], eps);
  }
  const auto coefficients = math::forward_coefficients(channel_mean, channel_invstd,
                                                       weight != nullptr ? weight[channel] : acc_t(1),
                                                       bias != nullptr ? bias[channel] : acc_t(0));
  mean[channel] = channel_mean;
  invstd[channel] = channel_invstd;
  scale[channel] = coefficients.scale;
  shift[channel] = coefficients.shift;
}

template <typename scalar_t>
__global__ void normalize_activate_kernel(const scalar_t* input, scalar_t* output,  // may be the same
                                          const at::opmath_type<scalar_t>* __restrict__ scale,
                                          const at::opmath_type<scalar_t>* __restrict__ shift, int64_t numel,
                                          int64_t channels, int64_t inner, at::opmath_type<scalar_t> negative_slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const int64_t channel = (i / inner) % channels;
    output[i] = static_cast<scalar_t>(
        math::normalize_activate<acc_t>(static_cast<acc_t>(input[i]), scale[channel], shift[channel], negative_slope));
  }
}

// A per-channel tensor as a dense accumulation-type vector (a copy unless it is one).
at::Tensor accumulation_vector(const at::Tensor& tensor, at::ScalarType accumulation) {
  return tensor.to(accumulation).contiguous();
}

template <typename acc_t>
const acc_t* pointer_or_null(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.const_data_ptr<acc_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> forward_into(const Operand& operand, const at::Tensor& output,
                                                const OptionalTensor& running_mean, const OptionalTensor& running_var,
                                                const OptionalTensor& weight, const OptionalTensor& bias,
                                                bool training, double momentum, double eps, double negative_slope) {
  const at::Tensor& input = operand.tensor;
  const auto [outer, channels, inner] = operand.layout;
  const int64_t count = outer * inner;
  const auto accumulation = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = input.options().dtype(accumulation);
  at::Tensor mean = at::empty({channels}, options);
  at::Tensor invstd = at::empty({channels}, options);
  if (channels == 0) {
    return {mean, invstd};
  }
  const bool has_running = running_mean.has_value() && running_mean->defined();
  // Dense accumulation-type copies the kernel updates, copied back into the (any dtype,
  // any stride) running statistics afterwards.
  at::Tensor running_mean_acc = has_running ? at::empty({channels}, options).copy_(*running_mean) : at::Tensor();
  at::Tensor running_var_acc = has_running ? at::empty({channels}, options).copy_(*running_var) : at::Tensor();
  const at::Tensor weight_acc = weight.has_value() && weight->defined() ? accumulation_vector(*weight, accumulation)
                                                                         : at::Tensor();
  const at::Tensor bias_acc = bias.has_value() && bias->defined() ? accumulation_vector(*bias, accumulation)
                                                                   : at::Tensor();
  at::Tensor scale = at::empty({channels}, options);
  at::Tensor shift = at::empty({channels}, options);
  const int64_t chunks = training ? std::max<int64_t>(1, (count + kReductionChunk - 1) / kReductionChunk) : 0;
  TORCH_CHECK(chunks < (int64_t{1} << 31) && channels < 65536, kForwardName,
              ": tensor too large for the CUDA grid (", channels, " channels)");
  at::Tensor chunk_mean = at::empty({channels, chunks}, options);
  at::Tensor chunk_m2 = at::empty({channels, chunks}, options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), kForwardName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (training && count > 0) {
      block_moments_kernel<scalar_t><<<dim3(static_cast<unsigned int>(chunks), static_cast<unsigned int>(channels)),
                                       kThreadsPerBlock, 0, stream>>>(
          input.const_data_ptr<scalar_t>(), chunk_mean.mutable_data_ptr<acc_t>(), chunk_m2.mutable_data_ptr<acc_t>(),
          count, channels, inner);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const unsigned int channel_blocks = static_cast<unsigned int>((channels + kThreadsPerBlock - 1) / kThreadsPerBlock);
    channel_statistics_kernel<acc_t><<<channel_blocks, kThreadsPerBlock, 0, stream>>>(
        chunk_mean.const_data_ptr<acc_t>(), chunk_m2.const_data_ptr<acc_t>(), count > 0 ? chunks : 0, count,
        has_running ? running_mean_acc.mutable_data_ptr<acc_t>() : nullptr,
        has_running ? running_var_acc.mutable_data_ptr<acc_t>() : nullptr, pointer_or_null<acc_t>(weight_acc),
        pointer_or_null<acc_t>(bias_acc), mean.mutable_data_ptr<acc_t>(), invstd.mutable_data_ptr<acc_t>(),
        scale.mutable_data_ptr<acc_t>(), shift.mutable_data_ptr<acc_t>(), channels, training,
        static_cast<acc_t>(momentum), static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t numel = input.numel();
    if (numel > 0) {
      normalize_activate_kernel<scalar_t><<<elementwise_blocks(numel), kThreadsPerBlock, 0, stream>>>(
          input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(),
          shift.const_data_ptr<acc_t>(), numel, channels, inner, static_cast<acc_t>(negative_slope));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (training && has_running && count > 0) {
    running_mean->copy_(running_mean_acc);
    running_var->copy_(running_var_acc);
  }
  return {mean, invstd};
}

// --- backward -----------------------------------------------------------------------------

// The per-channel coefficient rows of the backward, one (channels,) row each.
enum Coefficient : int64_t { kScale, kShift, kValueScale, kValueShift, kK, kP, kQ, kCoefficients };

// Grid (chunks, channels): sum(g_pre) and sum(g_pre * x_hat) of the chunk, at [channel, chunk].
template <typename scalar_t, bool kFromOutput>
__global__ void block_gradient_sums_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ saved,
                                           const at::opmath_type<scalar_t>* __restrict__ coefficients,
                                           at::opmath_type<scalar_t>* __restrict__ sum_g,
                                           at::opmath_type<scalar_t>* __restrict__ sum_gx, int64_t count,
                                           int64_t channels, int64_t inner, at::opmath_type<scalar_t> negative_slope,
                                           at::opmath_type<scalar_t> inverse_slope) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t warp_totals[kWarp];
  const int64_t channel = blockIdx.y;
  const Chunk chunk = chunk_of_block(count);
  const math::ForwardCoefficients<acc_t> forward{coefficients[kScale * channels + channel],
                                                  coefficients[kShift * channels + channel]};
  const acc_t value_scale = coefficients[kValueScale * channels + channel];
  const acc_t value_shift = coefficients[kValueShift * channels + channel];
  acc_t g_total = 0;
  acc_t gx_total = 0;
  for (int64_t j = chunk.begin + threadIdx.x; j < chunk.end; j += blockDim.x) {
    const int64_t index = channel_offset(j, channel, channels, inner);
    const auto read = math::read_saved<acc_t>(kFromOutput, static_cast<acc_t>(saved[index]), inverse_slope, forward);
    const acc_t grad_pre = math::masked_gradient(static_cast<acc_t>(grad_output[index]), read.positive, negative_slope);
    g_total += grad_pre;
    gx_total = math::fused_multiply_add(grad_pre, math::fused_multiply_add(read.value, value_scale, value_shift),
                                        gx_total);
  }
  const acc_t chunk_g = block_total(g_total, warp_totals);
  const acc_t chunk_gx = block_total(gx_total, warp_totals);
  if (threadIdx.x == 0) {
    sum_g[channel * gridDim.x + blockIdx.x] = chunk_g;
    sum_gx[channel * gridDim.x + blockIdx.x] = chunk_gx;
  }
}

// One thread per channel: the chunks' sums added in order, and grad_x's k, p, q.
template <typename acc_t>
__global__ void channel_gradients_kernel(const acc_t* __restrict__ chunk_g, const acc_t* __restrict__ chunk_gx,
                                         int64_t chunks, int64_t count, const acc_t* __restrict__ weight,
                                         const acc_t* __restrict__ invstd, acc_t* coefficients,
                                         acc_t* __restrict__ sum_g, acc_t* __restrict__ sum_gx, int64_t channels,
                                         bool training) {
  const int64_t channel = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (channel >= channels) {
    return;
  }
  acc_t g_total = 0;
  acc_t gx_total = 0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    g_total += chunk_g[channel * chunks + chunk];
    gx_total += chunk_gx[channel * chunks + chunk];
  }
  const auto gradient = math::input_gradient_coefficients<acc_t>(
      training && count > 0, static_cast<acc_t>(count), g_total, gx_total,
      weight != nullptr ? weight[channel] : acc_t(1), invstd[channel],
      {coefficients[kValueScale * channels + channel], coefficients[kValueShift * channels + channel]});
  coefficients[kK * channels + channel] = gradient.k;
  coefficients[kP * channels + channel] = gradient.p;
  coefficients[kQ * channels + channel] = gradient.q;
  sum_g[channel] = g_total;
  sum_gx[channel] = gx_total;
}

// One thread per channel: the forward's scale and shift, and x_hat's coefficients.
template <typename acc_t>
__global__ void backward_coefficients_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                             const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                             acc_t* __restrict__ coefficients, int64_t channels, bool from_output) {
  const int64_t channel = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (channel >= channels) {
    return;
  }
  const acc_t channel_weight = weight != nullptr ? weight[channel] : acc_t(1);
  const acc_t channel_bias = bias != nullptr ? bias[channel] : acc_t(0);
  const auto forward = math::forward_coefficients(mean[channel], invstd[channel], channel_weight, channel_bias);
  const auto normalized =
      math::normalized_coefficients(from_output, mean[channel], invstd[channel], channel_weight, channel_bias);
  coefficients[kScale * channels + channel] = forward.scale;
  coefficients[kShift * channels + channel] = forward.shift;
  coefficients[kValueScale * channels + channel] = normalized.value_scale;
  coefficients[kValueShift * channels + channel] = normalized.value_shift;
}

template <typename scalar_t, bool kFromOutput>
__global__ void input_gradient_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ saved,
                                      scalar_t* __restrict__ grad_input,
                                      const at::opmath_type<scalar_t>* __restrict__ coefficients, int64_t numel,
                                      int64_t channels, int64_t inner, at::opmath_type<scalar_t> negative_slope,
                                      at::opmath_type<scalar_t> inverse_slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const int64_t channel = (i / inner) % channels;
    const math::ForwardCoefficients<acc_t> forward{coefficients[kScale * channels + channel],
                                                    coefficients[kShift * channels + channel]};
    const auto read = math::read_saved<acc_t>(kFromOutput, static_cast<acc_t>(saved[i]), inverse_slope, forward);
    const acc_t grad_pre = math::masked_gradient(static_cast<acc_t>(grad_output[i]), read.positive, negative_slope);
    grad_input[i] = static_cast<scalar_t>(math::fused_multiply_add(
        grad_pre, coefficients[kK * channels + channel],
        math::fused_multiply_add(read.value, coefficients[kP * channels + channel],
                                 coefficients[kQ * channels + channel])));
  }
}

template <typename scalar_t, bool kFromOutput>
void backward_passes(const at::Tensor& grad_output, const Operand& saved, const at::Tensor& grad_input,
                     const at::Tensor& coefficients, const at::Tensor& weight_acc, const at::Tensor& invstd,
                     const at::Tensor& sum_g, const at::Tensor& sum_gx, bool training, double negative_slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto [outer, channels, inner] = saved.layout;
  const int64_t count = outer * inner;
  const int64_t chunks = std::max<int64_t>(1, (count + kReductionChunk - 1) / kReductionChunk);
  TORCH_CHECK(chunks < (int64_t{1} << 31) && channels < 65536, kBackwardName,
              ": tensor too large for the CUDA grid (", channels, " channels)");
  const auto options = coefficients.options();
  at::Tensor chunk_g = at::empty({channels, chunks}, options);
  at::Tensor chunk_gx = at::empty({channels, chunks}, options);
  const acc_t slope = static_cast<acc_t>(negative_slope);
  const acc_t inverse_slope = kFromOutput ? acc_t(1) / slope : acc_t(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (count > 0) {
    block_gradient_sums_kernel<scalar_t, kFromOutput>
        <<<dim3(static_cast<unsigned int>(chunks), static_cast<unsigned int>(channels)), kThreadsPerBlock, 0, stream>>>(
            grad_output.const_data_ptr<scalar_t>(), saved.tensor.const_data_ptr<scalar_t>(),
            coefficients.const_data_ptr<acc_t>(), chunk_g.mutable_data_ptr<acc_t>(), chunk_gx.mutable_data_ptr<acc_t>(),
            count, channels, inner, slope, inverse_slope);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const unsigned int channel_blocks = static_cast<unsigned int>((channels + kThreadsPerBlock - 1) / kThreadsPerBlock);
  channel_gradients_kernel<acc_t><<<channel_blocks, kThreadsPerBlock, 0, stream>>>(
      chunk_g.const_data_ptr<acc_t>(), chunk_gx.const_data_ptr<acc_t>(), count > 0 ? chunks : 0, count,
      pointer_or_null<acc_t>(weight_acc), invstd.const_data_ptr<acc_t>(), coefficients.mutable_data_ptr<acc_t>(),
      sum_g.mutable_data_ptr<acc_t>(), sum_gx.mutable_data_ptr<acc_t>(), channels, training);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t numel = saved.tensor.numel();
  if (numel > 0) {
    input_gradient_kernel<scalar_t, kFromOutput><<<elementwise_blocks(numel), kThreadsPerBlock, 0, stream>>>(
        grad_output.const_data_ptr<scalar_t>(), saved.tensor.const_data_ptr<scalar_t>(),
        grad_input.mutable_data_ptr<scalar_t>(), coefficients.const_data_ptr<acc_t>(), numel, channels, inner, slope,
        inverse_slope);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Both backward passes on prepared operands: grad_dense has the saved operand's strides,
// and grad_input (which may be grad_dense itself) too. Returns (grad_weight, grad_bias).
std::tuple<at::Tensor, at::Tensor> backward_into(const at::Tensor& grad_dense, const Operand& saved, bool from_output,
                                                 const at::Tensor& grad_input, const at::Tensor& mean,
                                                 const at::Tensor& invstd, const OptionalTensor& weight,
                                                 const OptionalTensor& bias, bool training, double negative_slope) {
  const int64_t channels = saved.layout.channels;
  const auto accumulation = saved.tensor.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = saved.tensor.options().dtype(accumulation);
  at::Tensor sum_g = at::zeros({channels}, options);
  at::Tensor sum_gx = at::zeros({channels}, options);
  const auto parameter_dtype = weight.has_value() && weight->defined() ? weight->scalar_type() : accumulation;
  if (channels == 0) {
    return {sum_gx.to(parameter_dtype), sum_g.to(parameter_dtype)};
  }
  const at::Tensor mean_acc = accumulation_vector(mean, accumulation);
  const at::Tensor invstd_acc = accumulation_vector(invstd, accumulation);
  const at::Tensor weight_acc = weight.has_value() && weight->defined() ? accumulation_vector(*weight, accumulation)
                                                                         : at::Tensor();
  const at::Tensor bias_acc = bias.has_value() && bias->defined() ? accumulation_vector(*bias, accumulation)
                                                                   : at::Tensor();
  at::Tensor coefficients = at::empty({kCoefficients, channels}, options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, saved.tensor.scalar_type(), kBackwardName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const unsigned int channel_blocks = static_cast<unsigned int>((channels + kThreadsPerBlock - 1) / kThreadsPerBlock);
    backward_coefficients_kernel<acc_t><<<channel_blocks, kThreadsPerBlock, 0, stream>>>(
        mean_acc.const_data_ptr<acc_t>(), invstd_acc.const_data_ptr<acc_t>(), pointer_or_null<acc_t>(weight_acc),
        pointer_or_null<acc_t>(bias_acc), coefficients.mutable_data_ptr<acc_t>(), channels, from_output);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    (from_output ? backward_passes<scalar_t, true> : backward_passes<scalar_t, false>)(
        grad_dense, saved, grad_input, coefficients, weight_acc, invstd_acc, sum_g, sum_gx, training, negative_slope);
  });
  return {sum_gx.to(parameter_dtype), sum_g.to(parameter_dtype)};
}

// The CUDA kernels, for the entries of csrc/batch_norm_leaky_relu.h (which set the device).
struct CudaPasses {
  static constexpr auto forward_into = cuda::forward_into;
  static constexpr auto backward_into = cuda::backward_into;
};

}  // namespace

TORCH_LIBRARY_IMPL(imggen_fast, CUDA, m) {
  batch_norm_leaky_relu::register_kernels<CudaPasses>(m);
}

}  // namespace imggen_fast::cuda
