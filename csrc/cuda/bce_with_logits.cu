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
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../bce_with_logits.h"
#include "cuda_utils.h"

namespace imggen_fast::cuda {
namespace {

constexpr int64_t kReductionNone = 0;
constexpr int64_t kReductionMean = 1;
// Elements per thread of the sweep: a block covers kThreadsPerBlock * kElementsPerThread
// elements, always the same ones whatever the grid, so the partial sums are fixed.
constexpr int kElementsPerThread = 4;
constexpr int64_t kChunk = static_cast<int64_t>(kThreadsPerBlock) * kElementsPerThread;

// The operands of one sweep over `numel` elements (see csrc/cpu/bce_with_logits.cpp).
template <typename scalar_t, typename acc_t>
struct Sweep {
  const scalar_t* input;
  int64_t numel;
  const scalar_t* target;  // null: target_value for every element
  acc_t target_value;
  const scalar_t* weight;  // null: unweighted
  int64_t weight_period;
  const scalar_t* pos_weight;
  int64_t pos_weight_period;
  scalar_t* loss_out;  // null: reduced into partials
  scalar_t* grad_out;  // null: no gradient
  acc_t grad_scale;
};

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

void check_reduction(const char* op, int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
              reduction);
}

void check_operand(const char* op, const at::Tensor& operand, const char* name, const at::Tensor& input) {
  TORCH_CHECK(operand.scalar_type() == input.scalar_type(), op, ": ", name, " dtype ", operand.scalar_type(),
              " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(operand.device() == input.device(), op, ": ", name, " device ", operand.device(),
              " does not match input device ", input.device());
}

// The tensors of one sweep, kept alive for it, in the input's dense layout.
struct SweepTensors {
  at::Tensor input;
  at::Tensor target;
  PeriodicOperand weight;
  PeriodicOperand pos_weight;
  at::Tensor loss;
  at::Tensor grad;

  template <typename scalar_t, typename acc_t>
  Sweep<scalar_t, acc_t> sweep(double target_value, acc_t grad_scale) const {
    const bool weighted = weight.values.defined();
    return {input.const_data_ptr<scalar_t>(),
            input.numel(),
            target.defined() ? target.const_data_ptr<scalar_t>() : nullptr,
            static_cast<acc_t>(target_value),
            weighted ? weight.values.const_data_ptr<scalar_t>() : nullptr,
            weight.period,
            weighted ? pos_weight.values.const_data_ptr<scalar_t>() : nullptr,
            pos_weight.period,
            loss.defined() ? loss.mutable_data_ptr<scalar_t>() : nullptr,
            grad.defined() ? grad.mutable_data_ptr<scalar_t>() : nullptr,
            grad_scale};
  }
};

SweepTensors sweep_tensors(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& target,
                           const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                           int64_t reduction, bool compute_grad) {
  SweepTensors tensors;
  tensors.input = dense(input);
  if (target.has_value()) {
    check_same_shape_and_dtype(op, *target, "target", input, "input");
    tensors.target = in_layout_of(*target, tensors.input);
  }
  if (weight.has_value()) {
    check_operand(op, *weight, "weight", input);
  }
  if (pos_weight.has_value()) {
    check_operand(op, *pos_weight, "pos_weight", input);
  }
  if (weight.has_value() || pos_weight.has_value()) {
    const auto operand = [&](const std::optional<at::Tensor>& value) {
      return value.has_value() ? periodic_operand(*value, tensors.input)
                               : PeriodicOperand{at::ones({1}, input.options()), 1};
    };
    tensors.weight = operand(weight);
    tensors.pos_weight = operand(pos_weight);
  }
  if (reduction == kReductionNone) {
    tensors.loss = at::empty_like(tensors.input);
  }
  if (compute_grad) {
    tensors.grad = at::empty_like(tensors.input);
  }
  return tensors;
}

// d loss / d loss_i: 1/N for "mean" (NaN for no elements, as torch's mean), else 1.
template <typename acc_t>
acc_t grad_scale(int64_t numel, int64_t reduction) {
  if (reduction != kReductionMean) {
    return acc_t(1);
  }
  return numel > 0 ? acc_t(1) / static_cast<acc_t>(numel) : std::numeric_limits<acc_t>::quiet_NaN();
}

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

std::tuple<at::Tensor, at::Tensor> bce_with_logits(const at::Tensor& input, const std::optional<at::Tensor>& target,
                                                   double target_value, const std::optional<at::Tensor>& weight,
                                                   const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                                                   bool compute_grad) {
  constexpr const char* op = "bce_with_logits";
  check_reduction(op, reduction);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const SweepTensors tensors = sweep_tensors(op, input, target, weight, pos_weight, reduction, compute_grad);
  const int64_t numel = tensors.input.numel();
  at::Tensor loss = reduction == kReductionNone ? tensors.loss : at::empty({}, input.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = grad_scale<acc_t>(numel, reduction);
    Sweep<scalar_t, acc_t> nothing = tensors.sweep<scalar_t, acc_t>(0.0, acc_t(0));
    nothing.numel = 0;
    run_sweeps(tensors.sweep<scalar_t, acc_t>(target_value, scale), nothing, scale, acc_t(0), loss, stream);
  });
  return {loss, compute_grad ? tensors.grad : input.new_empty({0})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gan_d_loss(const at::Tensor& real_logits, const at::Tensor& fake_logits,
                                                          double real_label, double fake_label, int64_t reduction,
                                                          bool compute_grad) {
  constexpr const char* op = "gan_d_loss";
  check_reduction(op, reduction);
  TORCH_CHECK(real_logits.scalar_type() == fake_logits.scalar_type(), op, ": fake_logits dtype ",
              fake_logits.scalar_type(), " does not match real_logits dtype ", real_logits.scalar_type());
  TORCH_CHECK(real_logits.device() == fake_logits.device(), op, ": fake_logits device ", fake_logits.device(),
              " does not match real_logits device ", real_logits.device());
  TORCH_CHECK(reduction != kReductionNone || real_logits.sizes() == fake_logits.sizes(), op,
              ": reduction='none' needs real_logits and fake_logits of one shape, got ", real_logits.sizes(),
              " and ", fake_logits.sizes());
  const c10::cuda::CUDAGuard device_guard(real_logits.device());
  const at::Tensor real_input = dense(real_logits);
  const at::Tensor fake_input = reduction == kReductionNone ? in_layout_of(fake_logits, real_input) : dense(fake_logits);
  const SweepTensors real = sweep_tensors(op, real_input, std::nullopt, std::nullopt, std::nullopt, reduction,
                                          compute_grad);
  const SweepTensors fake = sweep_tensors(op, fake_input, std::nullopt, std::nullopt, std::nullopt, reduction,
                                          compute_grad);
  at::Tensor loss = reduction == kReductionNone ? real.loss : at::empty({}, real_logits.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, real_logits.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t real_scale = grad_scale<acc_t>(real_input.numel(), reduction);
    const acc_t fake_scale = grad_scale<acc_t>(fake_input.numel(), reduction);
    run_sweeps(real.sweep<scalar_t, acc_t>(real_label, real_scale), fake.sweep<scalar_t, acc_t>(fake_label, fake_scale),
               real_scale, fake_scale, loss, stream);
  });
  if (reduction == kReductionNone) {
    loss.add_(fake.loss);
  }
  // Two distinct empty tensors when no gradient is stored: outputs must not alias.
  return {loss, compute_grad ? real.grad : real_logits.new_empty({0}),
          compute_grad ? fake.grad : fake_logits.new_empty({0})};
}

std::vector<at::Tensor> bce_with_logits_backward(const at::Tensor& grad_output, at::TensorList unit_grads,
                                                 int64_t reduction) {
  constexpr const char* op = "bce_with_logits_backward";
  check_reduction(op, reduction);
  const c10::cuda::CUDAGuard device_guard(grad_output.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> results;
  for (const at::Tensor& unit_grad_in : unit_grads) {
    TORCH_CHECK(unit_grad_in.scalar_type() == grad_output.scalar_type(), op, ": unit_grads dtype ",
                unit_grad_in.scalar_type(), " does not match grad_output dtype ", grad_output.scalar_type());
    const bool elementwise = reduction == kReductionNone;
    TORCH_CHECK(elementwise ? grad_output.sizes() == unit_grad_in.sizes() : grad_output.numel() == 1, op,
                ": grad_output shape ", grad_output.sizes(), " does not fit unit_grads shape ", unit_grad_in.sizes(),
                " for reduction ", reduction);
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
  m.impl("bce_with_logits", &bce_with_logits);
  m.impl("gan_d_loss", &gan_d_loss);
  m.impl("bce_with_logits_backward", &bce_with_logits_backward);
}

}  // namespace imggen_fast::cuda
