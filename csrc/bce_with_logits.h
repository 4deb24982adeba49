// Element math of binary cross-entropy with logits, shared by csrc/cpu/bce_with_logits.cpp
// and csrc/cuda/bce_with_logits.cu (and by the GAN losses, which are two BCE terms with
// number targets). `acc_t` is the accumulation type: float for float/bfloat16/half
// storage, double for double.
//
// With x the logit, y the target, w the weight and p the pos_weight:
//   loss = w * ((1 - y) * x + l * softplus(-x)),   l = 1 + (p - 1) * y (the "log weight")
//   d loss / d x = w * (l * sigmoid(x) - p * y)
// Without pos_weight (p = 1, l = 1) this is max(x, 0) - x * y + log1p(exp(-|x|)) and
// sigmoid(x) - y.
#pragma once

#include <cmath>

#include "host_device.h"

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
IMGGEN_FAST_HOST_DEVICE acc_t bce_with_logits_loss(acc_t x, acc_t y, acc_t weight, acc_t pos_weight) {
  using std::log1p;
  const acc_t log_weight = acc_t(1) + (pos_weight - acc_t(1)) * y;
  const acc_t linear = x >= acc_t(0) ? (acc_t(1) - y) * x : -pos_weight * y * x;
  return weight * (linear + log_weight * log1p(exp_minus_abs(x)));
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
// max(x, 0) - x * y + log1p(exp(-|x|)) and sigmoid(x) - y (in the form above).
template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t bce_with_logits_loss(acc_t x, acc_t y) {
  using std::log1p;
  return (x > acc_t(0) ? x : acc_t(0)) - x * y + log1p(exp_minus_abs(x));
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
  const acc_t linear = non_negative ? (acc_t(1) - y) * x : -pos_weight * y * x;
  const acc_t small_side = log_weight * (decay / (acc_t(1) + decay));
  return {weight * (linear + log_weight * log1p(decay)),
          weight * (non_negative ? (acc_t(1) - y) - small_side : small_side - pos_weight * y)};
}

}  // namespace imggen_fast::math
