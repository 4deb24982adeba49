// The fused BatchNorm + LeakyReLU, y = leaky_relu(batch_norm(x), slope): its element and
// per-channel math, shared by csrc/cpu/batch_norm_leaky_relu.cpp and
// csrc/cuda/batch_norm_leaky_relu.cu (imggen_fast::math), and the host helpers both kernels
// use to check and lay out their operands (imggen_fast::batch_norm_leaky_relu).
//
// The input is seen as (outer, channels, inner) around its channel dim 1: element
// (o, c, i) at o * channels * inner + c * inner + i. Contiguous inputs give
// inner = prod(sizes after dim 1); channels-last inputs (channels innermost in memory:
// channels_last, channels_last_3d, and 2-D (N, C)) give inner = 1.
//
// Forward: per-channel mean and variance (training) from fixed blocks, each block's
// (count, mean, M2) computed exactly (two passes over the block while it is in cache) and
// the blocks merged in a fixed order by Chan et al.'s formula: numerically sound, and the
// same bits for any thread count. Then y = leaky_relu(x * scale + shift) with
// scale = weight * invstd, shift = bias - mean * scale.
//
// Backward: the normalized input x_hat comes either from the input (x - mean) * invstd, or
// from the activated output (InPlace-ABN): x_hat = (leaky_relu^-1(y) - bias) / weight. One
// reduction pass gives sum(g_pre) and sum(g_pre * x_hat) per channel (g_pre: the gradient
// of the pre-activation), one elementwise pass gives
// grad_x = weight * invstd * (g_pre - mean(g_pre) - x_hat * mean(g_pre * x_hat))
// (training; in eval the two means are 0), written as g_pre * k + v * p + q with v the
// value x_hat is read from (x, or the pre-activation recovered from y).
//
// `acc_t` is the accumulation type: float for float/bfloat16/half storage, double for double.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "backend.h"
#include "host_device.h"
#include "layout.h"
#include "leaky_relu.h"

namespace imggen_fast::math {

// a * b + c with one rounding, on the host and on the device: the kernels' vector and
// scalar code then give the same bits, so a mask recomputed in backward matches forward's.
template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t fused_multiply_add(acc_t a, acc_t b, acc_t c) {
#if defined(__CUDA_ARCH__)
  return ::fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// Merges the moments (count, mean, m2) of a block into a running summary of earlier blocks
// (Chan, Golub and LeVeque 1979): the deviation of the two means is weighted, never the
// raw sums, so no large sums cancel. m2 is the sum of squared deviations from the mean.
template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE void merge_moments(acc_t& count, acc_t& mean, acc_t& m2, acc_t block_count, acc_t block_mean,
                                           acc_t block_m2) {
  if (block_count == acc_t(0)) {
    return;
  }
  const acc_t total = count + block_count;
  const acc_t delta = block_mean - mean;
  const acc_t block_share = block_count / total;
  mean += delta * block_share;
  m2 += block_m2 + delta * delta * count * block_share;
  count = total;
}

template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t inverse_std(acc_t biased_variance, acc_t eps) {
#if defined(__CUDA_ARCH__)
  return acc_t(1) / ::sqrt(biased_variance + eps);
#else
  return acc_t(1) / std::sqrt(biased_variance + eps);
#endif
}

// torch's update of a running statistic (_BatchNorm, F.batch_norm): the running variance
// takes the unbiased batch variance m2 / (count - 1).
template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t running_update(acc_t running, acc_t batch, acc_t momentum) {
  return momentum * batch + (acc_t(1) - momentum) * running;
}

// y = leaky_relu(x * scale + shift): the forward's per-channel affine map.
template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t normalize_activate(acc_t x, acc_t scale, acc_t shift, acc_t negative_slope) {
  return leaky_relu_forward<acc_t>(fused_multiply_add(x, scale, shift), negative_slope);
}

// The pre-activation recovered from y = leaky_relu(pre, slope), slope > 0.
template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t pre_activation_from_output(acc_t output, acc_t inverse_slope) {
  return output > acc_t(0) ? output : output * inverse_slope;
}

// Per-channel coefficients of the forward: y = leaky_relu(x * scale + shift).
template <typename acc_t>
struct ForwardCoefficients {
  acc_t scale;
  acc_t shift;
};

template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE ForwardCoefficients<acc_t> forward_coefficients(acc_t mean, acc_t invstd, acc_t weight,
                                                                        acc_t bias) {
  const acc_t scale = weight * invstd;
  return {scale, bias - mean * scale};
}

// Per-channel coefficients of x_hat = v * value_scale + value_shift, v the value the
// backward reads: the input x (x_hat = (x - mean) * invstd), or the pre-activation
// recovered from the output (x_hat = (pre - bias) / weight).
template <typename acc_t>
struct NormalizedCoefficients {
  acc_t value_scale;
  acc_t value_shift;
};

template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE NormalizedCoefficients<acc_t> normalized_coefficients(bool from_output, acc_t mean,
                                                                              acc_t invstd, acc_t weight,
                                                                              acc_t bias) {
  if (from_output) {
    const acc_t inverse_weight = acc_t(1) / weight;
    return {inverse_weight, -bias * inverse_weight};
  }
  return {invstd, -mean * invstd};
}

// Per-channel coefficients of grad_x = g_pre * k + v * p + q (v as above), from the
// channel's sums of g_pre and g_pre * x_hat over its `count` elements:
// grad_x = k * (g_pre - sum_g / count - x_hat * sum_gx / count), k = weight * invstd, in
// training; grad_x = k * g_pre in eval, where the statistics are constants.
template <typename acc_t>
struct InputGradientCoefficients {
  acc_t k;
  acc_t p;
  acc_t q;
};

template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE InputGradientCoefficients<acc_t> input_gradient_coefficients(
    bool training, acc_t count, acc_t sum_g, acc_t sum_gx, acc_t weight, acc_t invstd,
    NormalizedCoefficients<acc_t> normalized) {
  const acc_t k = weight * invstd;
  if (!training) {
    return {k, acc_t(0), acc_t(0)};
  }
  const acc_t k0 = -(sum_g / count) * k;
  const acc_t k1 = -(sum_gx / count) * k;
  return {k, normalized.value_scale * k1, fused_multiply_add(normalized.value_shift, k1, k0)};
}

// The gradient of the pre-activation: grad where it was positive, grad * slope elsewhere
// (leaky_relu_backward_from_output's rule, with the mask given).
template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t masked_gradient(acc_t grad, bool positive, acc_t negative_slope) {
  return positive ? grad : grad * negative_slope;
}

// The backward's per-element values: v (the pre-activation recovered from y, or x itself)
// and the mask (pre-activation > 0), from the saved value `saved` (y or x).
template <typename acc_t>
struct SavedValue {
  acc_t value;
  bool positive;
};

template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE SavedValue<acc_t> read_saved(bool from_output, acc_t saved, acc_t inverse_slope,
                                                     ForwardCoefficients<acc_t> forward) {
  if (from_output) {
    return {pre_activation_from_output(saved, inverse_slope), saved > acc_t(0)};
  }
  // The forward's own pre-activation, computed as forward computed it: the same mask.
  return {saved, fused_multiply_add(saved, forward.scale, forward.shift) > acc_t(0)};
}

}  // namespace imggen_fast::math

namespace imggen_fast::batch_norm_leaky_relu {

using OptionalTensor = std::optional<at::Tensor>;

// The kernel ops' names and signatures (csrc/registration.cpp).
constexpr const char* kForwardName = "batch_norm_leaky_relu_forward";
constexpr const char* kForwardInPlaceName = "batch_norm_leaky_relu_forward_";
constexpr const char* kBackwardName = "batch_norm_leaky_relu_backward";
constexpr const char* kBackwardInPlaceName = "batch_norm_leaky_relu_backward_";
using ForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
    bool, double, double, double);
using ForwardInPlaceSignature = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
    bool, double, double, double);
using BackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const at::Tensor&, const at::Tensor&,
    const OptionalTensor&, const OptionalTensor&, bool, double);
using BackwardInPlaceSignature = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const at::Tensor&, const at::Tensor&,
    const OptionalTensor&, const OptionalTensor&, bool, double);

// The input seen as (outer, channels, inner) (see the top of this file), and the tensor
// the kernels read: the input itself when it is contiguous or channels-last, else a copy
// in the memory format it suggests (only gapped, overlapping or unusually permuted views
// are copied).
struct Operand {
  at::Tensor tensor;
  ChannelLayout layout;
};

// True when moving dim 1 last would make the tensor contiguous: channels_last and
// channels_last_3d tensors, an (N, L, C) tensor seen as (N, C, L). Dims of size 1 are
// ignored, as is_contiguous ignores them.
inline bool channels_innermost(const at::Tensor& tensor) {
  if (tensor.size(1) != 1 && tensor.stride(1) != 1) {
    return false;
  }
  int64_t expected = tensor.size(1);
  for (int64_t dim = tensor.dim() - 1; dim >= 0; --dim) {
    if (dim == 1) {
      continue;
    }
    if (tensor.size(dim) != 1 && tensor.stride(dim) != expected) {
      return false;
    }
    expected *= tensor.size(dim);
  }
  return true;
}

inline std::optional<ChannelLayout> layout_of(const at::Tensor& tensor) {
  const int64_t channels = tensor.size(1);
  if (tensor.is_contiguous()) {
    int64_t inner = 1;
    for (int64_t dim = 2; dim < tensor.dim(); ++dim) inner *= tensor.size(dim);
    return ChannelLayout{tensor.size(0), channels, inner};
  }
  if (channels_innermost(tensor)) {
    return ChannelLayout{channels ? tensor.numel() / channels : 0, channels, 1};
  }
  return std::nullopt;
}

inline Operand input_operand(const at::Tensor& input) {
  if (const auto layout = layout_of(input)) {
    return {input, *layout};
  }
  const at::Tensor copy = input.contiguous(input.suggest_memory_format());
  if (const auto layout = layout_of(copy)) {
    return {copy, *layout};
  }
  const at::Tensor contiguous = input.contiguous();
  return {contiguous, *layout_of(contiguous)};
}

// The output of a call on `input`: input's own strides (as the fake implementation and
// torch.empty_like give), and the tensor the kernel writes: that output itself when
// it has the operand's strides, else a scratch tensor like the operand, which
// finish_output then copies into the output.
struct Output {
  at::Tensor result;
  at::Tensor written;
};

inline Output output_for(const at::Tensor& input, const Operand& operand) {
  at::Tensor result = at::empty_like(input);
  if (result.strides() == operand.tensor.strides()) {
    return {result, result};
  }
  return {result, at::empty_like(operand.tensor)};
}

inline void finish_output(const Output& output) {
  if (!output.written.is_same(output.result)) {
    output.result.copy_(output.written);
  }
}

inline void check_per_channel(const char* op, const std::optional<at::Tensor>& tensor, const char* name,
                              const at::Tensor& input) {
  if (!tensor.has_value() || !tensor->defined()) {
    return;
  }
  TORCH_CHECK(tensor->dim() == 1 && tensor->size(0) == input.size(1), op, ": ", name, " must have shape (C,) = (",
              input.size(1), ",) for input of shape ", input.sizes(), ", got ", tensor->sizes());
  TORCH_CHECK(tensor->device() == input.device(), op, ": ", name, " is on ", tensor->device(), " but input is on ",
              input.device());
  const auto dtype = tensor->scalar_type();
  const bool mixed = (input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kHalf) && dtype == at::kFloat;
  TORCH_CHECK(dtype == input.scalar_type() || mixed, op, ": ", name,
              " must have input's dtype (", input.scalar_type(), "), or float32 for a bfloat16 / float16 input; got ",
              dtype);
}

inline void check_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, op, ": input must be (N, C, *) with at least 2 dims, got shape ", input.sizes());
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": input must be float32, float64, bfloat16 or float16, got ", dtype);
}

// The checks of a forward call made directly through torch.ops (imggen_fast.functional
// checks the same before any kernel runs, with Python errors naming the argument).
inline void check_forward(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
                          const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, bool training, double momentum, double eps,
                          double negative_slope) {
  check_input(op, input);
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_mean == has_var, op, ": running_mean and running_var must both be tensors or both be None");
  TORCH_CHECK(training || has_mean, op, ": running_mean and running_var are needed when training=False");
  check_per_channel(op, running_mean, "running_mean", input);
  check_per_channel(op, running_var, "running_var", input);
  for (const auto& [statistic, name] : {std::pair<const std::optional<at::Tensor>&, const char*>{running_mean,
                                                                                                 "running_mean"},
                                        std::pair<const std::optional<at::Tensor>&, const char*>{running_var,
                                                                                                 "running_var"}}) {
    TORCH_CHECK(!training || !has_mean || at::has_internal_overlap(*statistic) != at::MemOverlap::Yes, op, ": ",
                name, " is updated in place, so its channels must not share memory (an expanded view does); got "
                "strides ", statistic->strides());
  }
  check_per_channel(op, weight, "weight", input);
  check_per_channel(op, bias, "bias", input);
  const int64_t channels = input.size(1);
  TORCH_CHECK(!training || channels == 0 || input.numel() / channels != 1, op,
              ": training needs more than 1 value per channel, got input of shape ", input.sizes());
  TORCH_CHECK(std::isfinite(momentum), op, ": momentum must be finite, got ", momentum);
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(negative_slope >= 0 && std::isfinite(negative_slope), op,
              ": negative_slope must be finite and >= 0, got ", negative_slope);
}

// The checks of a backward call made directly through torch.ops: exactly one of input and
// output (the tensor x_hat is read from), of grad_output's shape; the statistics (C,).
inline void check_backward(const char* op, const at::Tensor& grad_output, const std::optional<at::Tensor>& input,
                           const std::optional<at::Tensor>& output, const at::Tensor& mean, const at::Tensor& invstd,
                           const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                           double negative_slope) {
  const bool has_input = input.has_value() && input->defined();
  const bool has_output = output.has_value() && output->defined();
  TORCH_CHECK(has_input != has_output, op, ": exactly one of input and output must be given");
  const at::Tensor& saved = has_input ? *input : *output;
  check_input(op, saved);
  check_same_shape_and_dtype(op, grad_output, "grad_output", saved, has_input ? "input" : "output");
  check_per_channel(op, weight, "weight", saved);
  check_per_channel(op, bias, "bias", saved);
  const auto accumulation = saved.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& [statistic, name] : {std::pair<const at::Tensor&, const char*>{mean, "mean"},
                                        std::pair<const at::Tensor&, const char*>{invstd, "invstd"}}) {
    TORCH_CHECK(statistic.dim() == 1 && statistic.size(0) == saved.size(1) && statistic.scalar_type() == accumulation &&
                    statistic.device() == saved.device(),
                op, ": ", name, " must be a (C,) = (", saved.size(1), ",) ", accumulation, " tensor on ",
                saved.device(), ", got ", statistic.sizes(), " ", statistic.scalar_type(), " on ", statistic.device());
  }
  TORCH_CHECK(negative_slope >= 0 && std::isfinite(negative_slope), op,
              ": negative_slope must be finite and >= 0, got ", negative_slope);
  TORCH_CHECK(!has_output || negative_slope > 0, op,
              ": the input cannot be recovered from the output when negative_slope is 0; pass input instead");
}

// The in-place backward writes grad_input over grad_output in the saved tensor's element
// order: both must have the same strides, of a layout the kernels read directly.
inline void check_in_place_gradient(const char* op, const at::Tensor& grad_output, const at::Tensor& saved) {
  TORCH_CHECK(grad_output.strides() == saved.strides() && layout_of(saved).has_value(), op,
              ": grad_output must have the strides of the saved tensor (contiguous or channels-last), got ",
              grad_output.strides(), " and ", saved.strides());
}

// The kernel ops' entries, written once for every device (the host wrapper of DESIGN.md):
// the checks, the hand-over to the Triton launcher when the Triton backend is chosen
// (checked first, so every backend gives the same errors), the device guard and the
// operand preparation; `Passes` is the device's kernels (CpuPasses, CudaPasses):
//   static std::tuple<Tensor, Tensor> forward_into(const Operand& input, const Tensor& output,
//       running_mean, running_var, weight, bias, training, momentum, eps, negative_slope)
//     -> (mean, invstd), writing output (which may be input.tensor);
//   static std::tuple<Tensor, Tensor> backward_into(const Tensor& grad_output, const Operand& saved,
//       bool from_output, const Tensor& grad_input, mean, invstd, weight, bias, training,
//       negative_slope) -> (grad_weight, grad_bias), grad_output and grad_input (which may be
//       grad_output) in the saved operand's strides.
template <typename Passes>
struct KernelEntries {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
      const at::Tensor& input, const OptionalTensor& running_mean, const OptionalTensor& running_var,
      const OptionalTensor& weight, const OptionalTensor& bias, bool training, double momentum, double eps,
      double negative_slope) {
    check_forward(kForwardName, input, running_mean, running_var, weight, bias, training, momentum, eps,
                  negative_slope);
    if (triton_chosen()) {
      return call_triton<ForwardSignature>(kForwardName, input, running_mean, running_var, weight, bias, training,
                                           momentum, eps, negative_slope);
    }
    const c10::DeviceGuard device_guard(input.device());
    const Operand operand = input_operand(input);
    const Output output = output_for(input, operand);
    auto [mean, invstd] = Passes::forward_into(operand, output.written, running_mean, running_var, weight, bias,
                                               training, momentum, eps, negative_slope);
    finish_output(output);
    return {output.result, mean, invstd};
  }

  // The same, writing the output over input.
  static std::tuple<at::Tensor, at::Tensor> forward_(const at::Tensor& input, const OptionalTensor& running_mean,
                                                     const OptionalTensor& running_var, const OptionalTensor& weight,
                                                     const OptionalTensor& bias, bool training, double momentum,
                                                     double eps, double negative_slope) {
    check_forward(kForwardInPlaceName, input, running_mean, running_var, weight, bias, training, momentum, eps,
                  negative_slope);
    if (triton_chosen()) {
      return call_triton<ForwardInPlaceSignature>(kForwardInPlaceName, input, running_mean, running_var, weight,
                                                  bias, training, momentum, eps, negative_slope);
    }
    const c10::DeviceGuard device_guard(input.device());
    const Operand operand = input_operand(input);
    auto statistics = Passes::forward_into(operand, operand.tensor, running_mean, running_var, weight, bias, training,
                                           momentum, eps, negative_slope);
    if (!operand.tensor.is_same(input)) {
      input.copy_(operand.tensor);  // a layout the kernels do not read: computed in a copy
    }
    return statistics;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_output, const OptionalTensor& input, const OptionalTensor& output, const at::Tensor& mean,
      const at::Tensor& invstd, const OptionalTensor& weight, const OptionalTensor& bias, bool training,
      double negative_slope) {
    check_backward(kBackwardName, grad_output, input, output, mean, invstd, weight, bias, negative_slope);
    if (triton_chosen()) {
      return call_triton<BackwardSignature>(kBackwardName, grad_output, input, output, mean, invstd, weight, bias,
                                            training, negative_slope);
    }
    const bool from_output = output.has_value() && output->defined();
    const at::Tensor& saved_tensor = from_output ? *output : *input;
    const c10::DeviceGuard device_guard(saved_tensor.device());
    const Operand saved = input_operand(saved_tensor);
    const Output grad_input = output_for(saved_tensor, saved);
    auto [grad_weight, grad_bias] =
        Passes::backward_into(in_layout_of(grad_output, saved.tensor), saved, from_output, grad_input.written, mean,
                              invstd, weight, bias, training, negative_slope);
    finish_output(grad_input);
    return {grad_input.result, grad_weight, grad_bias};
  }

  // The same, writing grad_input over grad_output (which must have the saved tensor's
  // strides, contiguous or channels-last): the autograd backward uses it when it owns
  // grad_output outright. Returns (grad_weight, grad_bias).
  static std::tuple<at::Tensor, at::Tensor> backward_(const at::Tensor& grad_output, const OptionalTensor& input,
                                                      const OptionalTensor& output, const at::Tensor& mean,
                                                      const at::Tensor& invstd, const OptionalTensor& weight,
                                                      const OptionalTensor& bias, bool training,
                                                      double negative_slope) {
    check_backward(kBackwardInPlaceName, grad_output, input, output, mean, invstd, weight, bias, negative_slope);
    const bool from_output = output.has_value() && output->defined();
    const at::Tensor& saved_tensor = from_output ? *output : *input;
    check_in_place_gradient(kBackwardInPlaceName, grad_output, saved_tensor);
    if (triton_chosen()) {
      return call_triton<BackwardInPlaceSignature>(kBackwardInPlaceName, grad_output, input, output, mean, invstd,
                                                   weight, bias, training, negative_slope);
    }
    const c10::DeviceGuard device_guard(saved_tensor.device());
    return Passes::backward_into(grad_output, input_operand(saved_tensor), from_output, grad_output, mean, invstd,
                                 weight, bias, training, negative_slope);
  }
};

// Registers the entries as the kernels of one device (inside its TORCH_LIBRARY_IMPL).
template <typename Passes>
void register_kernels(torch::Library& library) {
  library.impl(kForwardName, &KernelEntries<Passes>::forward);
  library.impl(kForwardInPlaceName, &KernelEntries<Passes>::forward_);
  library.impl(kBackwardName, &KernelEntries<Passes>::backward);
  library.impl(kBackwardInPlaceName, &KernelEntries<Passes>::backward_);
}

}  // namespace imggen_fast::batch_norm_leaky_relu
