// CUDA kernels of the fused VAE reparameterization + KL, on the current stream. The
// element math and the noise (Philox4x32-10 + Box-Muller, Triton's tl.randn4x) are
// csrc/reparameterize_kl.h, shared with the CPU kernel.
//
// One block per chunk of up to kChunk elements of one sample; each thread makes whole
// 4-element noise groups (one Philox call serves four elements) and hands them out
// through shared memory, so that each warp accesses consecutive elements. The KL is reduced
// deterministically: each block sums its terms in a fixed tree (per-thread sums in a
// fixed order, then warp shuffles, then the warps in order) into one partial sum, and
// a second kernel adds the partial sums of each sample (or of the batch) the same way.
// No atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <tuple>

#include "../backend.h"
#include "../reparameterize_kl.h"
#include "cuda_utils.h"

namespace imggen_fast::cuda {
namespace {

using namespace reparameterize_kl;  // the host helpers shared with the other device's kernels

// Elements of one sample per block: 16 per thread.
constexpr int64_t kChunk = 16 * kThreadsPerBlock;
constexpr int kWarps = kThreadsPerBlock / 32;

// The sum of `value` over the block, the same bits every run: warp shuffles in a fixed
// pattern, then the warp sums in order. The result is valid in thread 0.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value) {
  __shared__ acc_t warp_sums[kWarps];
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  if (threadIdx.x % 32 == 0) {
    warp_sums[threadIdx.x / 32] = value;
  }
  __syncthreads();
  acc_t total = 0;
  if (threadIdx.x == 0) {
    for (int warp = 0; warp < kWarps; ++warp) {
      total += warp_sums[warp];
    }
  }
  return total;
}

// The block's chunk: flat indices [begin, end) of sample `sample`.
struct Chunk {
  int64_t sample;
  int64_t begin;
  int64_t end;
};

__device__ Chunk block_chunk(int64_t per_sample, int64_t chunks_per_sample) {
  const int64_t block = blockIdx.x;
  Chunk chunk;
  chunk.sample = block / chunks_per_sample;
  chunk.begin = chunk.sample * per_sample + (block % chunks_per_sample) * kChunk;
  const int64_t sample_end = (chunk.sample + 1) * per_sample;
  chunk.end = chunk.begin + kChunk < sample_end ? chunk.begin + kChunk : sample_end;
  return chunk;
}

// Runs element(i, noise) for every flat index i of the chunk, kThreadsPerBlock * 4
// elements at a time: thread t makes the four normals of group (base + t) (one Philox
// call, when kNeedsNoise; else noise is 0) into shared memory, then takes elements
// 4 * base + t, + kThreadsPerBlock, ..., so that a warp reads and writes 32 consecutive
// elements per access (a thread taking its own group's four consecutive elements would
// use a quarter of each warp access).
template <bool kNeedsNoise, typename Element>
__device__ void for_each_chunk_element(const Chunk& chunk, uint64_t seed, const Element& element) {
  constexpr int kStep = math::kNormalsPerGroup * kThreadsPerBlock;
  __shared__ float4 noise[kThreadsPerBlock];
  static_assert(math::kNormalsPerGroup == 4, "one float4 of normals per group");
  // The loop bound is the same for every thread of the block: __syncthreads is safe.
  for (int64_t base = chunk.begin / math::kNormalsPerGroup; base * math::kNormalsPerGroup < chunk.end;
       base += kThreadsPerBlock) {
    if (kNeedsNoise) {
      const int64_t group = base + threadIdx.x;
      if (group * math::kNormalsPerGroup < chunk.end) {
        const math::Normals4 normals = math::randn4x(seed, static_cast<uint64_t>(group));
        noise[threadIdx.x] = make_float4(normals.values[0], normals.values[1], normals.values[2], normals.values[3]);
      }
      __syncthreads();
    }
    const float* normals = reinterpret_cast<const float*>(noise);
    for (int local = threadIdx.x; local < kStep; local += kThreadsPerBlock) {
      const int64_t i = base * math::kNormalsPerGroup + local;
      if (i >= chunk.begin && i < chunk.end) {
        element(i, kNeedsNoise ? normals[local] : 0.0f);
      }
    }
    if (kNeedsNoise) {
      __syncthreads();  // every thread has read this step's noise before the next one writes it
    }
  }
}

template <typename scalar_t, bool kHasEps>
__global__ void reparameterize_kl_forward_kernel(const scalar_t* __restrict__ mu, const scalar_t* __restrict__ logvar,
                                                 const scalar_t* __restrict__ eps, const int64_t* __restrict__ seed,
                                                 scalar_t* __restrict__ z, at::opmath_type<scalar_t>* partial,
                                                 int64_t per_sample, int64_t chunks_per_sample) {
  using acc_t = at::opmath_type<scalar_t>;
  const Chunk chunk = block_chunk(per_sample, chunks_per_sample);
  const uint64_t seed_value = kHasEps ? 0 : static_cast<uint64_t>(*seed);
  acc_t terms = 0;
  for_each_chunk_element<!kHasEps>(chunk, seed_value, [&](int64_t i, float normal) {
    const acc_t mu_value = static_cast<acc_t>(mu[i]);
    const acc_t logvar_value = static_cast<acc_t>(logvar[i]);
    const acc_t noise = kHasEps ? static_cast<acc_t>(eps[i]) : static_cast<acc_t>(normal);
    const acc_t std_value = exp(acc_t(0.5) * logvar_value);
    z[i] = static_cast<scalar_t>(math::reparameterize<acc_t>(mu_value, noise, std_value));
    terms += math::kl_term<acc_t>(mu_value, logvar_value, std_value);
  });
  const acc_t total = block_sum(terms);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = total;
  }
}

// kl[b] = factor * (partial[b * count] + ... + partial[b * count + count - 1]).
template <typename scalar_t>
__global__ void kl_finish_kernel(const at::opmath_type<scalar_t>* __restrict__ partial, scalar_t* __restrict__ kl,
                                 int64_t count, at::opmath_type<scalar_t> factor) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * count;
  acc_t sum = 0;
  for (int64_t index = threadIdx.x; index < count; index += kThreadsPerBlock) {
    sum += partial[first + index];
  }
  const acc_t total = block_sum(sum);
  if (threadIdx.x == 0) {
    kl[blockIdx.x] = static_cast<scalar_t>(factor * total);
  }
}

template <typename scalar_t, bool kHasEps, bool kHasGradZ>
__global__ void reparameterize_kl_backward_kernel(
    const scalar_t* __restrict__ grad_z, const scalar_t* __restrict__ grad_kl, int64_t grad_kl_stride,
    at::opmath_type<scalar_t> kl_grad_factor, const scalar_t* __restrict__ mu, const scalar_t* __restrict__ logvar,
    const scalar_t* __restrict__ eps, const int64_t* __restrict__ seed, scalar_t* __restrict__ grad_mu,
    scalar_t* __restrict__ grad_logvar, int64_t per_sample, int64_t chunks_per_sample) {
  using acc_t = at::opmath_type<scalar_t>;
  const Chunk chunk = block_chunk(per_sample, chunks_per_sample);
  const acc_t kl_grad =
      grad_kl == nullptr ? acc_t(0) : static_cast<acc_t>(grad_kl[chunk.sample * grad_kl_stride]) * kl_grad_factor;
  const uint64_t seed_value = (kHasEps || !kHasGradZ) ? 0 : static_cast<uint64_t>(*seed);
  for_each_chunk_element<kHasGradZ && !kHasEps>(chunk, seed_value, [&](int64_t i, float normal) {
    const acc_t mu_value = static_cast<acc_t>(mu[i]);
    const acc_t std_value = exp(acc_t(0.5) * static_cast<acc_t>(logvar[i]));
    acc_t grad_z_value = 0;
    acc_t noise = 0;
    if (kHasGradZ) {
      grad_z_value = static_cast<acc_t>(grad_z[i]);
      noise = kHasEps ? static_cast<acc_t>(eps[i]) : static_cast<acc_t>(normal);
    }
    grad_mu[i] = static_cast<scalar_t>(math::grad_mu<acc_t>(grad_z_value, kl_grad, mu_value));
    grad_logvar[i] = static_cast<scalar_t>(math::grad_logvar<acc_t>(grad_z_value, kl_grad, noise, std_value));
  });
}

int64_t chunks_per_sample(const Operands& operands) {
  return std::max<int64_t>(1, (operands.per_sample + kChunk - 1) / kChunk);
}

unsigned int grid_blocks(const Operands& operands, const char* op) {
  const int64_t blocks = operands.samples * chunks_per_sample(operands);
  TORCH_CHECK(blocks < (int64_t{1} << 31), op, ": too many samples and chunks (", blocks, ") for one grid");
  return static_cast<unsigned int>(blocks);
}

std::tuple<at::Tensor, at::Tensor> reparameterize_kl_forward(const at::Tensor& mu, const at::Tensor& logvar,
                                                             const c10::optional<at::Tensor>& eps,
                                                             const c10::optional<at::Tensor>& seed, double beta,
                                                             c10::string_view reduction_name) {
  if (triton_chosen()) {
    return call_triton<decltype(reparameterize_kl_forward)>("reparameterize_kl_forward", mu, logvar, eps, seed, beta, reduction_name);
  }
  const Reduction reduction = parse_reduction(reduction_name);
  const c10::cuda::CUDAGuard device_guard(mu.device());
  const Operands operands = batch_major_operands(kForwardName, mu, logvar, eps);
  const bool has_eps = operands.eps.defined();
  if (!has_eps) {
    check_seed(kForwardName, seed, mu);
  }
  const int64_t samples = operands.samples;
  const bool per_sample_kl = reduction == Reduction::kNone;
  const double factor = -0.5 * beta * reduction_factor(reduction, samples, operands.per_sample);
  at::Tensor z = at::empty_like(operands.mu);
  if (operands.mu.numel() == 0) {
    // Every per-sample sum is 0 (or there are none): kl is factor * 0, NaN for the means of nothing.
    return {z, at::full(per_sample_kl ? at::IntArrayRef{samples} : at::IntArrayRef{}, factor * 0.0, mu.options())};
  }
  at::Tensor kl = at::empty(per_sample_kl ? at::IntArrayRef{samples} : at::IntArrayRef{}, mu.options());
  const unsigned int blocks = grid_blocks(operands, kForwardName);
  const int64_t chunks = chunks_per_sample(operands);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mu.scalar_type(), kForwardName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({static_cast<int64_t>(blocks)}, mu.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    auto kernel = has_eps ? reparameterize_kl_forward_kernel<scalar_t, true>
                          : reparameterize_kl_forward_kernel<scalar_t, false>;
    kernel<<<blocks, kThreadsPerBlock, 0, stream>>>(
        operands.mu.const_data_ptr<scalar_t>(), operands.logvar.const_data_ptr<scalar_t>(),
        has_eps ? operands.eps.const_data_ptr<scalar_t>() : nullptr,
        has_eps ? nullptr : seed->const_data_ptr<int64_t>(), z.mutable_data_ptr<scalar_t>(),
        partial.mutable_data_ptr<acc_t>(), operands.per_sample, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const unsigned int outputs = per_sample_kl ? static_cast<unsigned int>(samples) : 1u;
    const int64_t count = per_sample_kl ? chunks : static_cast<int64_t>(blocks);
    const acc_t output_factor = static_cast<acc_t>(per_sample_kl ? -0.5 * beta : factor);
    kl_finish_kernel<scalar_t><<<outputs, kThreadsPerBlock, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), kl.mutable_data_ptr<scalar_t>(), count, output_factor);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor> reparameterize_kl_backward(
    const c10::optional<at::Tensor>& grad_z, const c10::optional<at::Tensor>& grad_kl, const at::Tensor& mu,
    const at::Tensor& logvar, const c10::optional<at::Tensor>& eps, const c10::optional<at::Tensor>& seed,
    double beta, c10::string_view reduction_name) {
  if (triton_chosen()) {
    return call_triton<decltype(reparameterize_kl_backward)>("reparameterize_kl_backward", grad_z, grad_kl, mu, logvar, eps, seed, beta, reduction_name);
  }
  const Reduction reduction = parse_reduction(reduction_name);
  const c10::cuda::CUDAGuard device_guard(mu.device());
  const Operands operands = backward_operands(grad_z, grad_kl, mu, logvar, eps, seed, reduction);
  const bool has_grad_z = operands.grad_z.defined();
  at::Tensor grad_mu = at::empty_like(operands.mu);
  at::Tensor grad_logvar = at::empty_like(operands.mu);
  if (operands.mu.numel() == 0) {
    return {grad_mu, grad_logvar};
  }
  const unsigned int blocks = grid_blocks(operands, kBackwardName);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mu.scalar_type(), kBackwardName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t kl_grad_factor =
        static_cast<acc_t>(beta * reduction_factor(reduction, operands.samples, operands.per_sample));
    const bool has_eps = operands.eps.defined();
    auto kernel = !has_grad_z ? reparameterize_kl_backward_kernel<scalar_t, true, false>
                  : has_eps   ? reparameterize_kl_backward_kernel<scalar_t, true, true>
                              : reparameterize_kl_backward_kernel<scalar_t, false, true>;
    kernel<<<blocks, kThreadsPerBlock, 0, stream>>>(
        has_grad_z ? operands.grad_z.const_data_ptr<scalar_t>() : nullptr,
        grad_kl.has_value() ? grad_kl->const_data_ptr<scalar_t>() : nullptr,
        grad_kl.has_value() && grad_kl->dim() == 1 ? grad_kl->stride(0) : 0, kl_grad_factor,
        operands.mu.const_data_ptr<scalar_t>(), operands.logvar.const_data_ptr<scalar_t>(),
        has_eps ? operands.eps.const_data_ptr<scalar_t>() : nullptr,
        (has_grad_z && !has_eps) ? seed->const_data_ptr<int64_t>() : nullptr, grad_mu.mutable_data_ptr<scalar_t>(),
        grad_logvar.mutable_data_ptr<scalar_t>(), operands.per_sample, chunks_per_sample(operands));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_mu, grad_logvar};
}

}  // namespace

TORCH_LIBRARY_IMPL(imggen_fast, CUDA, m) {
  m.impl("reparameterize_kl_forward", &reparameterize_kl_forward);
  m.impl("reparameterize_kl_backward", &reparameterize_kl_backward);
}

}  // namespace imggen_fast::cuda
