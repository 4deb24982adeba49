// Element math of binary cross-entropy with logits, shared by csrc/cpu/bce_with_logits.cpp
// and csrc/cuda/bce_with_logits.cu (and by the GAN losses, which are two BCE terms with
// number targets), then the host-side checks and operand preparation both files share.
// `acc_t` is the accumulation type: float for float/bfloat16/half storage, double for
// double.
//
// With x the logit, y the target, w the weight and p the pos_weight:
//   loss = w * ((1 - y) * x + l * softplus(-x)),   l = 1 + (p - 1) * y (the "log weight")
//   d loss / d x = w * (l * sigmoid(x) - p * y)
// Without pos_weight (p = 1, l = 1) this is max(x, 0) - x * y + log1p(exp(-|x|)) and
// sigmoid(x) - y.
//
// At infinite logits the losses are eager's (torch evaluates the textbook form): x = +inf
// gives (1 - y) * x (NaN for y = 1), x = -inf gives NaN (there -x and the linear term
// cancel to inf - inf), although the limits are finite for hard labels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "host_device.h"
#include "layout.h"

namespace imggen_fast::math {

// exp(-|x|) in (0, 1]: never overflows, and is all softplus and sigmoid need.
template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t exp_minus_abs(acc_t x) {
  using std::exp;
  using std::fabs;
  return exp(-fabs(x));
}

// The loss of one element. softplus(-x) = max(-x, 0) + log1p(exp(-|x|)); its max(-x, 0)
// merged with the linear term leaves two non-negative terms for 0 <= y <= 1, p >= 0:
// (1 - y) * x for x >= 0, and -p * y * x for x < 0 (the x and -x of the textbook form
// cancel exactly instead of losing digits). A NaN logit takes the x < 0 branch: NaN out.
template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t linear_term(acc_t x, acc_t y, acc_t pos_weight) {
  if (x == -std::numeric_limits<acc_t>::infinity()) {
    return std::numeric_limits<acc_t>::quiet_NaN();  // eager's inf - inf
  }
  return x >= acc_t(0) ? (acc_t(1) - y) * x : -pos_weight * y * x;
}

template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t bce_with_logits_loss(acc_t x, acc_t y, acc_t weight, acc_t pos_weight) {
  using std::log1p;
  const acc_t log_weight = acc_t(1) + (pos_weight - acc_t(1)) * y;
  return weight * (linear_term(x, y, pos_weight) + log_weight * log1p(exp_minus_abs(x)));
}

// sigmoid(-|x|) = e / (1 + e) with e = exp(-|x|): never overflows. sigmoid(x) is 1 minus
// it for x >= 0, and it for x < 0.
template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t sigmoid_minus_abs(acc_t x) {
  const acc_t decay = exp_minus_abs(x);
  return decay / (acc_t(1) + decay);
}

// d loss / d x of one element, written directly (not derived from the stable forward):
// w * (l * sigmoid(x) - p * y), which is w * ((1 - y) - l * sigmoid(-|x|)) for x >= 0 and
// w * (l * sigmoid(-|x|) - p * y) for x < 0: no 1 - sigmoid(-|x|) is rounded to 1 first, so
// a saturated logit with a hard label keeps its small gradient. NaN takes the x < 0 branch.
template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t bce_with_logits_grad(acc_t x, acc_t y, acc_t weight, acc_t pos_weight) {
  const acc_t log_weight = acc_t(1) + (pos_weight - acc_t(1)) * y;
  const acc_t small_side = log_weight * sigmoid_minus_abs(x);
  return weight * (x >= acc_t(0) ? (acc_t(1) - y) - small_side : small_side - pos_weight * y);
}

// The unweighted loss and gradient (weight = pos_weight = 1), what the GAN losses use:
// max(x, 0) - x * y + log1p(exp(-|x|)) and sigmoid(x) - y (in the forms above).
template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t bce_with_logits_loss(acc_t x, acc_t y) {
  using std::log1p;
  return linear_term(x, y, acc_t(1)) + log1p(exp_minus_abs(x));
}

template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t bce_with_logits_grad(acc_t x, acc_t y) {
  const acc_t small_side = sigmoid_minus_abs(x);
  return x >= acc_t(0) ? (acc_t(1) - y) - small_side : small_side - y;
}

// The loss and the gradient of one element from one exp (what a kernel writing both
// uses): the same formulas as above.
template <typename acc_t>
struct LossAndGrad {
  acc_t loss;
  acc_t grad;
};

template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE LossAndGrad<acc_t> bce_with_logits_loss_and_grad(acc_t x, acc_t y, acc_t weight,
                                                                        acc_t pos_weight) {
  using std::log1p;
  const acc_t decay = exp_minus_abs(x);
  const acc_t log_weight = acc_t(1) + (pos_weight - acc_t(1)) * y;
  const bool non_negative = x >= acc_t(0);
  const acc_t small_side = log_weight * (decay / (acc_t(1) + decay));
  return {weight * (linear_term(x, y, pos_weight) + log_weight * log1p(decay)),
          weight * (non_negative ? (acc_t(1) - y) - small_side : small_side - pos_weight * y)};
}

}  // namespace imggen_fast::math

namespace imggen_fast {

// One BCE sweep as flat arrays over the input's memory: element i has logit input[i],
// target target[i] (or target_value), weight weight[i % weight_period] and pos_weight
// pos_weight[i % pos_weight_period] (weight == nullptr: unweighted, both absent). Its
// loss goes to loss_out[i] (reduction "none") or into the reduced sum; with grad_out,
// grad_scale * d loss_i / d input_i goes to grad_out[i].
template <typename scalar_t, typename acc_t>
struct BceSweep {
  const scalar_t* input = nullptr;
  int64_t numel = 0;
  const scalar_t* target = nullptr;
  acc_t target_value = 0;
  const scalar_t* weight = nullptr;
  int64_t weight_period = 1;
  const scalar_t* pos_weight = nullptr;
  int64_t pos_weight_period = 1;
  scalar_t* loss_out = nullptr;
  scalar_t* grad_out = nullptr;
  acc_t grad_scale = 1;
};

// at::Reduction's values, as the schemas pass them.
constexpr int64_t kReductionNone = 0;
constexpr int64_t kReductionMean = 1;

// The Python layer validates arguments before any kernel runs; these checks keep a direct
// torch.ops call from reading out of bounds.
inline void check_reduction(const char* op, int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
              reduction);
}

inline void check_same_dtype_and_device(const char* op, const at::Tensor& value, const char* name,
                                        const at::Tensor& input, const char* input_name) {
  TORCH_CHECK(value.scalar_type() == input.scalar_type(), op, ": ", name, " dtype ", value.scalar_type(),
              " does not match ", input_name, " dtype ", input.scalar_type());
  TORCH_CHECK(value.device() == input.device(), op, ": ", name, " device ", value.device(), " does not match ",
              input_name, " device ", input.device());
}

inline void check_gan_d_loss_arguments(const char* op, const at::Tensor& real_logits, const at::Tensor& fake_logits,
                                       int64_t reduction) {
  check_reduction(op, reduction);
  check_same_dtype_and_device(op, fake_logits, "fake_logits", real_logits, "real_logits");
  TORCH_CHECK(reduction != kReductionNone || real_logits.sizes() == fake_logits.sizes(), op,
              ": reduction='none' needs real_logits and fake_logits of one shape, got ", real_logits.sizes(),
              " and ", fake_logits.sizes());
}

// The tensors one sweep reads and writes, kept alive for it, in the input's dense layout.
struct BceTensors {
  at::Tensor input;
  at::Tensor target;       // undefined: a number target
  PeriodicOperand weight;  // values undefined: unweighted
  PeriodicOperand pos_weight;
  at::Tensor loss;  // reduction "none": the losses
  at::Tensor grad;  // undefined: no gradient

  template <typename scalar_t, typename acc_t>
  BceSweep<scalar_t, acc_t> sweep(double target_value, acc_t grad_scale) const {
    BceSweep<scalar_t, acc_t> sweep;
    sweep.input = input.const_data_ptr<scalar_t>();
    sweep.numel = input.numel();
    sweep.target = target.defined() ? target.const_data_ptr<scalar_t>() : nullptr;
    sweep.target_value = static_cast<acc_t>(target_value);
    if (weight.values.defined()) {
      sweep.weight = weight.values.const_data_ptr<scalar_t>();
      sweep.weight_period = weight.period;
      sweep.pos_weight = pos_weight.values.const_data_ptr<scalar_t>();
      sweep.pos_weight_period = pos_weight.period;
    }
    sweep.loss_out = loss.defined() ? loss.mutable_data_ptr<scalar_t>() : nullptr;
    sweep.grad_out = grad.defined() ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    sweep.grad_scale = grad_scale;
    return sweep;
  }
};

// Checks the operands and lays them out for a sweep: the input dense, the target in its
// layout, weight and pos_weight periodic (ones for an absent one when the other is given;
// a period shorter than minimum_period, and than the input, tiled up to it), the loss
// (reduction "none") and the gradient (compute_grad) allocated in the input's layout.
inline BceTensors bce_tensors(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& target,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                              int64_t reduction, bool compute_grad, int64_t minimum_period) {
  BceTensors tensors;
  tensors.input = dense(input);
  if (target.has_value()) {
    check_same_shape_and_dtype(op, *target, "target", input, "input");
    tensors.target = in_layout_of(*target, tensors.input);
  }
  if (weight.has_value()) {
    check_same_dtype_and_device(op, *weight, "weight", input, "input");
  }
  if (pos_weight.has_value()) {
    check_same_dtype_and_device(op, *pos_weight, "pos_weight", input, "input");
  }
  if ((weight.has_value() || pos_weight.has_value()) && input.numel() > 0) {
    const auto periodic = [&](const std::optional<at::Tensor>& operand) {
      PeriodicOperand result = operand.has_value() ? periodic_operand(*operand, tensors.input)
                                                   : PeriodicOperand{at::ones({1}, input.options()), 1};
      if (result.period < minimum_period && result.period < input.numel()) {
        const int64_t copies = (minimum_period + result.period - 1) / result.period;
        result = {result.values.repeat({copies}), result.period * copies};
      }
      return result;
    };
    tensors.weight = periodic(weight);
    tensors.pos_weight = periodic(pos_weight);
  }
  if (reduction == kReductionNone) {
    tensors.loss = at::empty_like(tensors.input);
  }
  if (compute_grad) {
    tensors.grad = at::empty_like(tensors.input);
  }
  return tensors;
}

// The GAN discriminator loss's outputs once both sweeps ran: for reduction "none" the fake
// losses added to the real ones in `loss`; two distinct empty tensors when no gradient
// was stored (outputs must not alias).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> gan_d_loss_outputs(at::Tensor loss, const BceTensors& real,
                                                                         const BceTensors& fake, int64_t reduction,
                                                                         bool compute_grad) {
  if (reduction == kReductionNone) {
    loss.add_(fake.loss);
  }
  return {loss, compute_grad ? real.grad : real.input.new_empty({0}),
          compute_grad ? fake.grad : fake.input.new_empty({0})};
}

// A stored gradient of the backward op must match grad_output's dtype, and its shape for
// reduction "none" (grad_output has one element otherwise).
inline void check_unit_grad(const char* op, const at::Tensor& grad_output, const at::Tensor& unit_grad,
                            int64_t reduction) {
  check_same_dtype_and_device(op, unit_grad, "unit_grads", grad_output, "grad_output");
  TORCH_CHECK(reduction == kReductionNone ? grad_output.sizes() == unit_grad.sizes() : grad_output.numel() == 1, op,
              ": grad_output shape ", grad_output.sizes(), " does not fit unit_grads shape ", unit_grad.sizes(),
              " for reduction ", reduction);
}

// d loss / d loss_i: 1 / numel for "mean" (NaN for no elements, as torch's mean), else 1.
template <typename acc_t>
acc_t bce_grad_scale(int64_t numel, int64_t reduction) {
  if (reduction != kReductionMean) {
    return acc_t(1);
  }
  return numel > 0 ? acc_t(1) / static_cast<acc_t>(numel) : std::numeric_limits<acc_t>::quiet_NaN();
}

}  // namespace imggen_fast
