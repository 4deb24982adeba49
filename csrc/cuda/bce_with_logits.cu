// CUDA kernels of binary cross-entropy with logits and of the GAN discriminator loss, on
// the current stream. The element math is csrc/bce_with_logits.h, shared with the CPU
// kernels. As there: the forward sweep reduces the loss (fixed chunks per block, a fixed
// tree in each block, then one block adding the partial sums in order: deterministic,
// no atomics) and, when asked, writes the gradient for grad_output = 1; the backward
// scales it (grad_output is read on the device, never synchronised to the host).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../backend.h"
#include "../bce_with_logits.h"
#include "cuda_utils.h"

namespace imggen_fast::cuda {
namespace {

// Elements per thread of the sweep: a block covers kThreadsPerBlock * kElementsPerThread
// elements, always the same ones whatever the grid, so the partial sums are fixed.
constexpr int kElementsPerThread = 4;
constexpr int64_t kChunk = static_cast<int64_t>(kThreadsPerBlock) * kElementsPerThread;

template <typename scalar_t, typename acc_t>
using Sweep = BceSweep<scalar_t, acc_t>;

// Sum of the values of a block's threads, by a fixed tree over shared memory.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value) {
  __shared__ acc_t shared[kThreadsPerBlock];
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreadsPerBlock / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      shared[threadIdx.x] += shared[threadIdx.x + stride];
    }
    __syncthreads();
  }
  return shared[0];
}

// Chunk `chunk` of one sweep: losses written or summed into partials[partial_index].
template <typename scalar_t, typename acc_t>
__device__ void sweep_chunk(const Sweep<scalar_t, acc_t>& sweep, int64_t chunk, acc_t* partials,
                            int64_t partial_index) {
  acc_t sum = 0;
  for (int k = 0; k < kElementsPerThread; ++k) {
    const int64_t i = chunk * kChunk + k * kThreadsPerBlock + threadIdx.x;
    if (i >= sweep.numel) {
      break;
    }
    const acc_t x = static_cast<acc_t>(sweep.input[i]);
    const acc_t y = sweep.target != nullptr ? static_cast<acc_t>(sweep.target[i]) : sweep.target_value;
    const acc_t weight = sweep.weight != nullptr ? static_cast<acc_t>(sweep.weight[i % sweep.weight_period]) : 1;
    const acc_t pos_weight =
        sweep.weight != nullptr ? static_cast<acc_t>(sweep.pos_weight[i % sweep.pos_weight_period]) : 1;
    const math::LossAndGrad<acc_t> values = math::bce_with_logits_loss_and_grad<acc_t>(x, y, weight, pos_weight);
    if (sweep.grad_out != nullptr) {
      sweep.grad_out[i] = static_cast<scalar_t>(sweep.grad_scale * values.grad);
    }
    if (sweep.loss_out != nullptr) {
      sweep.loss_out[i] = static_cast<scalar_t>(values.loss);
    } else {
      sum += values.loss;
    }
  }
  if (sweep.loss_out == nullptr) {
    const acc_t block_total = block_sum(sum);
    if (threadIdx.x == 0) {
      partials[partial_index] = block_total;
    }
  }
}

// Blocks [0, first_chunks) sweep `first`, the rest `second` (the GAN loss: real, fake).
template <typename scalar_t, typename acc_t>
__global__ void bce_with_logits_kernel(Sweep<scalar_t, acc_t> first, Sweep<scalar_t, acc_t> second,
                                       int64_t first_chunks, acc_t* partials) {
  const int64_t block = blockIdx.x;
  if (block < first_chunks) {
    sweep_chunk(first, block, partials, block);
  } else {
    sweep_chunk(second, block - first_chunks, partials, block);
  }
}

// One block: loss = first_scale * sum(partials[:first_count]) + second_scale * sum(the
// next second_count), each thread adding a fixed stride of them in order, then a fixed tree.
template <typename scalar_t, typename acc_t>
__global__ void sum_partials_kernel(const acc_t* partials, int64_t first_count, acc_t first_scale,
                                    int64_t second_count, acc_t second_scale, scalar_t* loss) {
  acc_t first = 0;
  for (int64_t i = threadIdx.x; i < first_count; i += kThreadsPerBlock) {
    first += partials[i];
  }
  acc_t second = 0;
  for (int64_t i = threadIdx.x; i < second_count; i += kThreadsPerBlock) {
    second += partials[first_count + i];
  }
  first = block_sum(first);
  __syncthreads();
  second = block_sum(second);
  if (threadIdx.x == 0) {
    // A term with no elements sums to 0: 0 for "sum", 0 * NaN = NaN for "mean" (torch's mean).
    *loss = static_cast<scalar_t>(first * first_scale + second * second_scale);
  }
}

// grad_input = grad_output * unit_grad; grad_output has one value, or one per element.
template <typename scalar_t>
__global__ void bce_with_logits_backward_kernel(const scalar_t* __restrict__ grad_output,
                                                const scalar_t* __restrict__ unit_grad,
                                                scalar_t* __restrict__ grad_input, int64_t numel, bool elementwise) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const acc_t scale = static_cast<acc_t>(grad_output[elementwise ? i : 0]);
    grad_input[i] = static_cast<scalar_t>(scale * static_cast<acc_t>(unit_grad[i]));
  }
}

// ---------------------------------------------------------------------------------------
// Host side.

int64_t chunk_count(int64_t numel) {
  return (numel + kChunk - 1) / kChunk;
}

// Sweeps `first` and `second` in one launch and, for a reduced loss, adds the partial
// sums into `loss` (first's and second's each times its scale) in a second, one-block launch.
template <typename scalar_t, typename acc_t>
void run_sweeps(const Sweep<scalar_t, acc_t>& first, const Sweep<scalar_t, acc_t>& second, acc_t first_scale,
                acc_t second_scale, const at::Tensor& loss, cudaStream_t stream) {
  const int64_t first_chunks = chunk_count(first.numel);
  const int64_t chunks = first_chunks + chunk_count(second.numel);
  const bool reduced = first.loss_out == nullptr;
  at::Tensor partials =
      at::empty({reduced ? chunks : 0}, loss.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  if (chunks > 0) {
    bce_with_logits_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(chunks), kThreadsPerBlock, 0, stream>>>(
        first, second, first_chunks, reduced ? partials.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (reduced) {
    sum_partials_kernel<scalar_t, acc_t><<<1, kThreadsPerBlock, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), first_chunks, first_scale, chunks - first_chunks, second_scale,
        loss.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> bce_with_logits_forward(const at::Tensor& input,
                                                           const std::optional<at::Tensor>& target,
                                                           double target_value,
                                                           const std::optional<at::Tensor>& weight,
                                                           const std::optional<at::Tensor>& pos_weight,
                                                           int64_t reduction, bool compute_grad) {
  if (triton_chosen()) {
    return call_triton<decltype(bce_with_logits_forward)>("bce_with_logits_forward", input, target, target_value, weight, pos_weight, reduction, compute_grad);
  }
  constexpr const char* op = "bce_with_logits_forward";
  check_reduction(op, reduction);
  const c10::cuda::CUDAGuard device_guard(input.device());
  // No tiling of short periods (minimum period 1): each thread computes its own index.
  const BceTensors tensors = bce_tensors(op, input, target, weight, pos_weight, reduction, compute_grad, 1);
  const int64_t numel = tensors.input.numel();
  at::Tensor loss = reduction == kReductionNone ? tensors.loss : at::empty({}, input.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = bce_grad_scale<acc_t>(numel, reduction);
    Sweep<scalar_t, acc_t> nothing = tensors.sweep<scalar_t, acc_t>(0.0, acc_t(0));
    nothing.numel = 0;
    run_sweeps(tensors.sweep<scalar_t, acc_t>(target_value, scale), nothing, scale, acc_t(0), loss, stream);
  });
  return {loss, compute_grad ? tensors.grad : input.new_empty({0})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gan_d_loss_forward(const at::Tensor& real_logits,
                                                                  const at::Tensor& fake_logits, double real_label,
                                                                  double fake_label, int64_t reduction,
                                                                  bool compute_grad) {
  if (triton_chosen()) {
    return call_triton<decltype(gan_d_loss_forward)>("gan_d_loss_forward", real_logits, fake_logits, real_label, fake_label, reduction, compute_grad);
  }
  constexpr const char* op = "gan_d_loss_forward";
  check_gan_d_loss_arguments(op, real_logits, fake_logits, reduction);
  const c10::cuda::CUDAGuard device_guard(real_logits.device());
  const at::Tensor real_input = dense(real_logits);
  const at::Tensor fake_input = reduction == kReductionNone ? in_layout_of(fake_logits, real_input) : dense(fake_logits);
  const BceTensors real = bce_tensors(op, real_input, std::nullopt, std::nullopt, std::nullopt, reduction,
                                      compute_grad, 1);
  const BceTensors fake = bce_tensors(op, fake_input, std::nullopt, std::nullopt, std::nullopt, reduction,
                                      compute_grad, 1);
  at::Tensor loss = reduction == kReductionNone ? real.loss : at::empty({}, real_logits.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, real_logits.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t real_scale = bce_grad_scale<acc_t>(real_input.numel(), reduction);
    const acc_t fake_scale = bce_grad_scale<acc_t>(fake_input.numel(), reduction);
    run_sweeps(real.sweep<scalar_t, acc_t>(real_label, real_scale), fake.sweep<scalar_t, acc_t>(fake_label, fake_scale),
               real_scale, fake_scale, loss, stream);
  });
  return gan_d_loss_outputs(loss, real, fake, reduction, compute_grad);
}

std::vector<at::Tensor> bce_with_logits_backward(const at::Tensor& grad_output, at::TensorList unit_grads,
                                                 int64_t reduction) {
  if (triton_chosen()) {
    return call_triton<decltype(bce_with_logits_backward)>("bce_with_logits_backward", grad_output, unit_grads, reduction);
  }
  constexpr const char* op = "bce_with_logits_backward";
  check_reduction(op, reduction);
  const c10::cuda::CUDAGuard device_guard(grad_output.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> results;
  for (const at::Tensor& unit_grad_in : unit_grads) {
    check_unit_grad(op, grad_output, unit_grad_in, reduction);
    const bool elementwise = reduction == kReductionNone;
    const at::Tensor unit_grad = dense(unit_grad_in);
    const at::Tensor scale = elementwise ? in_layout_of(grad_output, unit_grad) : grad_output;
    at::Tensor grad_input = at::empty_like(unit_grad);
    const int64_t numel = unit_grad.numel();
    if (numel > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, unit_grad.scalar_type(), op, [&] {
        bce_with_logits_backward_kernel<scalar_t><<<elementwise_blocks(numel), kThreadsPerBlock, 0, stream>>>(
            scale.const_data_ptr<scalar_t>(), unit_grad.const_data_ptr<scalar_t>(),
            grad_input.mutable_data_ptr<scalar_t>(), numel, elementwise);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    results.push_back(grad_input);
  }
  return results;
}

}  // namespace

TORCH_LIBRARY_IMPL(imggen_fast, CUDA, m) {
  m.impl("bce_with_logits_forward", &bce_with_logits_forward);
  m.impl("gan_d_loss_forward", &gan_d_loss_forward);
  m.impl("bce_with_logits_backward", &bce_with_logits_backward);
}

}  // namespace imggen_fast::cuda
