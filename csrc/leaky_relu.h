// Element math of the LeakyReLU epilogue, shared by csrc/cpu/leaky_relu.cpp and
// csrc/cuda/leaky_relu.cu. `acc_t` is the accumulation type: float for
// float/bfloat16/half storage, double for double.
#pragma once

#include "host_device.h"

namespace imggen_fast::math {

// y = leaky_relu(pre, slope).
template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t leaky_relu_forward(acc_t pre, acc_t negative_slope) {
  return pre > acc_t(0) ? pre : pre * negative_slope;
}

// d pre = d y * (y > 0 ? 1 : slope). The mask is read from the activated output y:
// for slope >= 0, sign(y) == sign(pre), so the pre-activation never has to be kept.
// y == 0 (pre == 0, or pre < 0 with slope == 0) takes the slope branch, as
// torch's leaky_relu_backward does for pre == 0.
template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t leaky_relu_backward_from_output(acc_t grad_output, acc_t output,
                                                              acc_t negative_slope) {
  return output > acc_t(0) ? grad_output : grad_output * negative_slope;
}

}  // namespace imggen_fast::math
