// Element math of the fused VAE reparameterization + KL, shared by
// csrc/cpu/reparameterize_kl.cpp and csrc/cuda/reparameterize_kl.cu: the Philox4x32-10
// generator with the Box-Muller transform, exactly as Triton's tl.randn4x computes it
// (triton/language/random.py), and the forward and backward formulas.
//
// The noise: element i of mu (its flat index in mu's memory order) takes normal i % 4 of
// tl.randn4x(seed, i / 4), i.e. Philox is keyed by the 64-bit seed and its counter is the
// 4-element group index, so one Philox call and two Box-Muller pairs serve four elements.
// `acc_t` is the accumulation type: float for float/bfloat16/half storage, double for double.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"
#include "layout.h"

namespace imggen_fast::math {

// Philox4x32 constants (Salmon et al. 2011), as in triton/language/random.py.
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;
// Elements per Philox call: each call gives 4 uint32, turned into 4 normals.
constexpr int kNormalsPerGroup = 4;

// Triton's uint_to_uniform_float: the largest scale with INT32_MAX * scale < 1 in float.
constexpr float kUniformScale = 4.6566127342e-10f;
// Box-Muller clamps the first uniform away from 0, so log() stays finite.
constexpr float kUniformFloor = 1.0e-7f;
constexpr float kTwoPi = 6.283185307179586f;

IMGGEN_FAST_HOST_DEVICE uint32_t multiply_high(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// One Philox round on the counter (c0, c1, c2, c3) with the round key (k0, k1).
IMGGEN_FAST_HOST_DEVICE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                                          uint32_t k1) {
  const uint32_t next_c0 = multiply_high(kPhiloxRoundB, c2) ^ c1 ^ k0;
  const uint32_t next_c2 = multiply_high(kPhiloxRoundA, c0) ^ c3 ^ k1;
  c1 = kPhiloxRoundB * c2;
  c3 = kPhiloxRoundA * c0;
  c0 = next_c0;
  c2 = next_c2;
}

// The four Philox4x32-10 outputs for the counter (group_lo, group_hi, 0, 0) under the key
// (seed_lo, seed_hi): triton's randint4x(seed, offset) with offset = group.
struct PhiloxBits {
  uint32_t bits[4];
};

IMGGEN_FAST_HOST_DEVICE PhiloxBits philox4x32_10(uint64_t seed, uint64_t group) {
  uint32_t c0 = static_cast<uint32_t>(group);
  uint32_t c1 = static_cast<uint32_t>(group >> 32);
  uint32_t c2 = 0;
  uint32_t c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return {{c0, c1, c2, c3}};
}

// Triton's uint_to_uniform_float: a uniform float in [0, 1) from 31 of the 32 bits.
IMGGEN_FAST_HOST_DEVICE float uint_to_uniform_float(uint32_t bits) {
  const int32_t value = static_cast<int32_t>(bits);
  return static_cast<float>(value < 0 ? ~value : value) * kUniformScale;
}

// Triton's pair_uniform_to_normal (Box-Muller): two independent N(0, 1) from two uniforms.
IMGGEN_FAST_HOST_DEVICE void pair_uniform_to_normal(float u1, float u2, float& n1, float& n2) {
  u1 = u1 > kUniformFloor ? u1 : kUniformFloor;
  const float angle = kTwoPi * u2;
  const float radius = sqrtf(-2.0f * logf(u1));
  n1 = radius * cosf(angle);
  n2 = radius * sinf(angle);
}

// The four normals of one group: tl.randn4x(seed, group).
struct Normals4 {
  float values[4];
};

IMGGEN_FAST_HOST_DEVICE Normals4 randn4x(uint64_t seed, uint64_t group) {
  const PhiloxBits random = philox4x32_10(seed, group);
  Normals4 normals;
  pair_uniform_to_normal(uint_to_uniform_float(random.bits[0]), uint_to_uniform_float(random.bits[1]),
                         normals.values[0], normals.values[1]);
  pair_uniform_to_normal(uint_to_uniform_float(random.bits[2]), uint_to_uniform_float(random.bits[3]),
                         normals.values[2], normals.values[3]);
  return normals;
}

// The noise of the element at flat index `index`.
IMGGEN_FAST_HOST_DEVICE float noise_at(uint64_t seed, int64_t index) {
  return randn4x(seed, static_cast<uint64_t>(index) / kNormalsPerGroup).values[index % kNormalsPerGroup];
}

// Forward, per element, with std = exp(0.5 * logvar):
//   z = mu + eps * std;   KL term 1 + logvar - mu^2 - std^2 (summed, then times -0.5 * beta).
// std^2 stands for exp(logvar): one exponential serves both outputs.
template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t reparameterize(acc_t mu, acc_t eps, acc_t std) {
  return mu + eps * std;
}

template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t kl_term(acc_t mu, acc_t logvar, acc_t std) {
  return acc_t(1) + logvar - mu * mu - std * std;
}

// Backward, per element. `kl_grad` is the gradient of the loss with respect to the
// element's per-sample KL, times beta and the reduction's factor (1, 1/N or 1/(N*D)):
// then d kl / d mu = kl_grad * mu and d kl / d logvar = kl_grad * 0.5 * (exp(logvar) - 1).
// `grad_z` is 0 where z was not used.
template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t grad_mu(acc_t grad_z, acc_t kl_grad, acc_t mu) {
  return grad_z + kl_grad * mu;
}

template <typename acc_t>
IMGGEN_FAST_HOST_DEVICE acc_t grad_logvar(acc_t grad_z, acc_t kl_grad, acc_t eps, acc_t std) {
  return acc_t(0.5) * (grad_z * eps * std + kl_grad * (std * std - acc_t(1)));
}

}  // namespace imggen_fast::math

// Host-side helpers shared by the CPU and CUDA launchers: argument checks, the
// reduction, and the batch-major layout the kernels sweep.
namespace imggen_fast::reparameterize_kl {

constexpr const char* kForwardName = "reparameterize_kl_forward";
constexpr const char* kBackwardName = "reparameterize_kl_backward";

enum class Reduction { kBatchMean, kSum, kMean, kNone };

inline Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "batchmean") return Reduction::kBatchMean;
  if (reduction == "sum") return Reduction::kSum;
  if (reduction == "mean") return Reduction::kMean;
  TORCH_CHECK(reduction == "none", "reparameterize_kl: reduction must be 'batchmean', 'sum', 'mean' or 'none', got '",
              reduction, "'");
  return Reduction::kNone;
}

// The factor a reduced KL applies to the sum of the per-sample values: NaN for the
// means of nothing, as torch's means give.
inline double reduction_factor(Reduction reduction, int64_t samples, int64_t per_sample) {
  switch (reduction) {
    case Reduction::kBatchMean:
      return 1.0 / static_cast<double>(samples);
    case Reduction::kMean:
      return 1.0 / static_cast<double>(samples * per_sample);
    case Reduction::kSum:
    case Reduction::kNone:
      break;
  }
  return 1.0;
}

// `tensor` dense with each sample's elements contiguous and the samples in order
// (contiguous and channels_last tensors qualify as they are; anything else is copied
// once, in the memory format it suggests where that qualifies, else contiguous).
inline at::Tensor batch_major(const at::Tensor& tensor) {
  at::Tensor result = dense(tensor);
  const int64_t samples = result.size(0);
  if (samples > 1 && result.numel() > 0 && result.stride(0) * samples != result.numel()) {
    result = result.contiguous();
  }
  return result;
}

// The operands of a call in one batch-major layout, mu's where it qualifies.
struct Operands {
  at::Tensor mu;
  at::Tensor logvar;
  at::Tensor eps;     // undefined when the noise comes from the seed
  at::Tensor grad_z;  // backward only; undefined when z was not used
  int64_t samples;
  int64_t per_sample;
};

inline Operands batch_major_operands(const char* op, const at::Tensor& mu, const at::Tensor& logvar,
                                     const c10::optional<at::Tensor>& eps) {
  TORCH_CHECK(mu.dim() >= 1, op, ": mu must have a batch dimension, got a 0-d tensor");
  check_same_shape_and_dtype(op, logvar, "logvar", mu, "mu");
  Operands operands;
  operands.mu = batch_major(mu);
  operands.logvar = in_layout_of(logvar, operands.mu);
  if (eps.has_value()) {
    check_same_shape_and_dtype(op, *eps, "eps", mu, "mu");
    operands.eps = in_layout_of(*eps, operands.mu);
  }
  operands.samples = operands.mu.size(0);
  operands.per_sample = operands.samples == 0 ? 0 : operands.mu.numel() / operands.samples;
  return operands;
}

inline void check_seed(const char* op, const c10::optional<at::Tensor>& seed, const at::Tensor& mu) {
  TORCH_CHECK(seed.has_value(), op, ": needs eps or seed");
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1 && seed->device() == mu.device(), op,
              ": seed must be a 1-element int64 tensor on mu's device, got ", seed->scalar_type(), " ",
              seed->sizes(), " on ", seed->device());
}

// grad_kl: () for the reduced KL, (batch,) for reduction "none"; mu's dtype and device.
inline void check_grad_kl(const char* op, const at::Tensor& grad_kl, Reduction reduction, const at::Tensor& mu) {
  const bool per_sample = reduction == Reduction::kNone;
  TORCH_CHECK(per_sample ? (grad_kl.dim() == 1 && grad_kl.size(0) == mu.size(0)) : grad_kl.dim() == 0, op,
              ": grad_kl must have shape ", per_sample ? "(batch,)" : "()", ", got ", grad_kl.sizes());
  TORCH_CHECK(grad_kl.scalar_type() == mu.scalar_type() && grad_kl.device() == mu.device(), op,
              ": grad_kl must have mu's dtype and device");
}

// The operands of a backward call. Without grad_z the noise is not needed, so neither
// eps nor the seed is read.
inline Operands backward_operands(const c10::optional<at::Tensor>& grad_z, const c10::optional<at::Tensor>& grad_kl,
                                  const at::Tensor& mu, const at::Tensor& logvar,
                                  const c10::optional<at::Tensor>& eps, const c10::optional<at::Tensor>& seed,
                                  Reduction reduction) {
  Operands operands = batch_major_operands(kBackwardName, mu, logvar, grad_z.has_value() ? eps : c10::nullopt);
  if (grad_z.has_value()) {
    check_same_shape_and_dtype(kBackwardName, *grad_z, "grad_z", mu, "mu");
    operands.grad_z = in_layout_of(*grad_z, operands.mu);
    if (!operands.eps.defined()) {
      check_seed(kBackwardName, seed, mu);
    }
  }
  if (grad_kl.has_value()) {
    check_grad_kl(kBackwardName, *grad_kl, reduction, mu);
  }
  return operands;
}

}  // namespace imggen_fast::reparameterize_kl
