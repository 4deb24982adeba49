// CPU kernels of the fused VAE reparameterization + KL: the forward writes z and the KL
// partial sums in one sweep; the backward writes grad_mu and grad_logvar in one sweep,
// regenerating the noise from the seed instead of reading it back.
//
// The KL is reduced deterministically: each sample's elements are cut into segments of
// at most kSegment elements (a cut that depends on the shape only), each segment is
// summed in a fixed order, the segment sums of a sample are added in order, and the
// per-sample values are added in order. The thread count only decides which thread
// computes which segment, so the bits do not depend on it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../reparameterize_kl.h"
#include "cpu_utils.h"

namespace imggen_fast::cpu {
namespace {

constexpr const char* kForwardName = "reparameterize_kl_forward";
constexpr const char* kBackwardName = "reparameterize_kl_backward";

// Elements per reduction segment: one sample's elements are summed in segments of this
// many, so a large sample still spreads over both cores.
constexpr int64_t kSegment = 4096;

using FloatVec = at::vec::Vectorized<float>;
// Philox groups generated together, one per float lane: 4 * kGroupsPerBatch normals.
constexpr int64_t kGroupsPerBatch = FloatVec::size();
constexpr int64_t kNormalsPerBatch = math::kNormalsPerGroup * kGroupsPerBatch;
// Normals generated at a time: few enough to stay in L1 beside the operands, a
// multiple of every vector width so the vectorized sweep runs on across pieces unchanged.
constexpr int64_t kNoisePiece = 512;
static_assert(kNoisePiece % kNormalsPerBatch == 0);

// The normals of the kGroupsPerBatch groups from `first_group`, in memory order:
// out[4 * g + k] = normal k of group first_group + g. The Philox rounds are written
// as plain loops over the lanes so the compiler vectorizes them (32-bit lanes, the
// high halves of the products from widening multiplies); Box-Muller runs on
// Vectorized<float> (Sleef's log, sin, cos).
inline void philox_normals_batch(uint64_t seed, uint64_t first_group, float* out) {
  alignas(64) uint32_t c0[kGroupsPerBatch];
  alignas(64) uint32_t c1[kGroupsPerBatch];
  alignas(64) uint32_t c2[kGroupsPerBatch];
  alignas(64) uint32_t c3[kGroupsPerBatch];
  for (int64_t lane = 0; lane < kGroupsPerBatch; ++lane) {
    const uint64_t group = first_group + static_cast<uint64_t>(lane);
    c0[lane] = static_cast<uint32_t>(group);
    c1[lane] = static_cast<uint32_t>(group >> 32);
    c2[lane] = 0;
    c3[lane] = 0;
  }
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < math::kPhiloxRounds; ++round) {
    for (int64_t lane = 0; lane < kGroupsPerBatch; ++lane) {
      math::philox_round(c0[lane], c1[lane], c2[lane], c3[lane], k0, k1);
    }
    k0 += math::kPhiloxKeyA;
    k1 += math::kPhiloxKeyB;
  }
  alignas(64) float uniform[4][kGroupsPerBatch];
  for (int64_t lane = 0; lane < kGroupsPerBatch; ++lane) {
    uniform[0][lane] = math::uint_to_uniform_float(c0[lane]);
    uniform[1][lane] = math::uint_to_uniform_float(c1[lane]);
    uniform[2][lane] = math::uint_to_uniform_float(c2[lane]);
    uniform[3][lane] = math::uint_to_uniform_float(c3[lane]);
  }
  const FloatVec floor_value(math::kUniformFloor);
  const FloatVec minus_two(-2.0f);
  const FloatVec two_pi(math::kTwoPi);
  FloatVec normal[4];
  for (int pair = 0; pair < 2; ++pair) {
    const FloatVec u1 = at::vec::maximum(FloatVec::loadu(uniform[2 * pair]), floor_value);
    const FloatVec angle = two_pi * FloatVec::loadu(uniform[2 * pair + 1]);
    const FloatVec radius = (minus_two * u1.log()).sqrt();
    normal[2 * pair] = radius * angle.cos();
    normal[2 * pair + 1] = radius * angle.sin();
  }
  // Interleave the four lanes-per-group vectors into memory order.
  const auto [first_third_low, first_third_high] = at::vec::interleave2(normal[0], normal[2]);
  const auto [second_fourth_low, second_fourth_high] = at::vec::interleave2(normal[1], normal[3]);
  const auto [out0, out1] = at::vec::interleave2(first_third_low, second_fourth_low);
  const auto [out2, out3] = at::vec::interleave2(first_third_high, second_fourth_high);
  out0.store(out);
  out1.store(out + FloatVec::size());
  out2.store(out + 2 * FloatVec::size());
  out3.store(out + 3 * FloatVec::size());
}

// Buffer for the normals of one piece: the piece, rounded out to whole batches.
struct NoiseBuffer {
  alignas(64) float values[kNoisePiece + 2 * kNormalsPerBatch];

  // Fills the normals of flat indices [first, first + count) (count <= kNoisePiece) and
  // returns where the normal of `first` lies.
  const float* fill(uint64_t seed, int64_t first, int64_t count) {
    const int64_t first_group = first / math::kNormalsPerGroup;
    const int64_t skipped = first - first_group * math::kNormalsPerGroup;
    for (int64_t done = 0; done < skipped + count; done += kNormalsPerBatch) {
      philox_normals_batch(seed, static_cast<uint64_t>(first_group + done / math::kNormalsPerGroup),
                           values + done);
    }
    return values + skipped;
  }
};

// Loads AccVec<scalar_t>::size() normals, widened to the accumulation type.
template <typename acc_t>
inline at::vec::Vectorized<acc_t> load_noise(const float* noise) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return FloatVec::loadu(noise);
  } else {
    using Vec = at::vec::Vectorized<acc_t>;
    alignas(64) acc_t widened[Vec::size()];
    for (int64_t lane = 0; lane < Vec::size(); ++lane) {
      widened[lane] = static_cast<acc_t>(noise[lane]);
    }
    return Vec::loadu(widened);
  }
}

enum class Reduction { kBatchMean, kSum, kMean, kNone };

Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "batchmean") return Reduction::kBatchMean;
  if (reduction == "sum") return Reduction::kSum;
  if (reduction == "mean") return Reduction::kMean;
  TORCH_CHECK(reduction == "none", "reparameterize_kl: reduction must be 'batchmean', 'sum', 'mean' or 'none', got '",
              reduction, "'");
  return Reduction::kNone;
}

// The factor a reduced KL applies to the sum of the per-sample KL values: NaN for the
// means of an empty batch, as torch's means give.
double reduction_factor(Reduction reduction, int64_t samples, int64_t per_sample) {
  switch (reduction) {
    case Reduction::kBatchMean:
      return 1.0 / static_cast<double>(samples);
    case Reduction::kMean:
      return 1.0 / static_cast<double>(samples * per_sample);
    case Reduction::kSum:
    case Reduction::kNone:
      return 1.0;
  }
  return 1.0;
}

// How a batch of `samples` samples of `per_sample` elements each (contiguous in memory,
// sample after sample) is cut into reduction segments.
struct Segments {
  int64_t samples;
  int64_t per_sample;
  int64_t per_sample_segments;  // segments of one sample
  int64_t length;               // elements of a full segment

  Segments(int64_t samples, int64_t per_sample)
      : samples(samples),
        per_sample(per_sample),
        per_sample_segments(std::max<int64_t>(1, (per_sample + kSegment - 1) / kSegment)),
        length(std::min(per_sample, kSegment)) {}

  int64_t count() const { return samples * per_sample_segments; }
  int64_t sample(int64_t segment) const { return segment / per_sample_segments; }
  int64_t begin(int64_t segment) const {
    return sample(segment) * per_sample + (segment % per_sample_segments) * kSegment;
  }
  int64_t end(int64_t segment) const {
    return std::min(begin(segment) + kSegment, (sample(segment) + 1) * per_sample);
  }
  // Segments per parallel_for chunk: about kElementwiseGrain elements.
  int64_t grain() const { return std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(1, length)); }
};

// A batch-major dense version of `tensor`: each sample's elements are contiguous and
// samples follow each other (contiguous and channels_last tensors qualify as they are;
// anything else is copied once, channels_last kept where the tensor suggests it).
at::Tensor batch_major(const at::Tensor& tensor) {
  at::Tensor result = dense(tensor);
  const int64_t samples = result.size(0);
  if (samples > 1 && result.numel() > 0 && result.stride(0) != result.numel() / samples) {
    result = result.contiguous();
  }
  return result;
}

uint64_t read_seed(const c10::optional<at::Tensor>& seed, const char* op) {
  TORCH_CHECK(seed.has_value(), op, ": needs eps or seed");
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1 && seed->device().is_cpu(), op,
              ": seed must be a 1-element int64 CPU tensor, got ", seed->scalar_type(), " ", seed->sizes(),
              " on ", seed->device());
  return static_cast<uint64_t>(seed->const_data_ptr<int64_t>()[0]);
}

void check_inputs(const char* op, const at::Tensor& mu, const at::Tensor& logvar,
                  const c10::optional<at::Tensor>& eps) {
  TORCH_CHECK(mu.dim() >= 1, op, ": mu must have a batch dimension, got a 0-d tensor");
  check_same_shape_and_dtype(op, logvar, "logvar", mu, "mu");
  if (eps.has_value()) {
    check_same_shape_and_dtype(op, *eps, "eps", mu, "mu");
  }
}

template <typename scalar_t, bool kHasEps>
void forward_sweep(const Segments& segments, const scalar_t* mu, const scalar_t* logvar, const scalar_t* eps,
                   uint64_t seed, scalar_t* z, acc_type<scalar_t>* segment_sums) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  at::parallel_for(0, segments.count(), segments.grain(), [&](int64_t first_segment, int64_t last_segment) {
    NoiseBuffer noise_buffer;
    const Vec half(acc_t(0.5));
    const Vec one(acc_t(1));
    for (int64_t segment = first_segment; segment < last_segment; ++segment) {
      const int64_t begin = segments.begin(segment);
      const int64_t end = segments.end(segment);
      Vec vector_sum(acc_t(0));
      acc_t tail_sum = 0;
      for (int64_t piece = begin; piece < end; piece += kNoisePiece) {
        const int64_t piece_end = std::min(piece + kNoisePiece, end);
        const float* noise = nullptr;
        if constexpr (!kHasEps) {
          noise = noise_buffer.fill(seed, piece, piece_end - piece);
        }
        int64_t i = piece;
        for (; i + Vec::size() <= piece_end; i += Vec::size()) {
          const Vec mu_values = load_acc(mu + i);
          const Vec logvar_values = load_acc(logvar + i);
          const Vec noise_values = kHasEps ? load_acc(eps + i) : load_noise<acc_t>(noise + (i - piece));
          const Vec std_values = (half * logvar_values).exp();
          store_acc(z + i, at::vec::fmadd(noise_values, std_values, mu_values));
          vector_sum += one + logvar_values - mu_values * mu_values - std_values * std_values;
        }
        for (; i < piece_end; ++i) {
          const acc_t mu_value = static_cast<acc_t>(mu[i]);
          const acc_t logvar_value = static_cast<acc_t>(logvar[i]);
          const acc_t noise_value = kHasEps ? static_cast<acc_t>(eps[i]) : static_cast<acc_t>(noise[i - piece]);
          const acc_t std_value = std::exp(acc_t(0.5) * logvar_value);
          z[i] = static_cast<scalar_t>(math::reparameterize<acc_t>(mu_value, noise_value, std_value));
          tail_sum += math::kl_term<acc_t>(mu_value, logvar_value, std_value);
        }
      }
      segment_sums[segment] =
          at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vector_sum) + tail_sum;
    }
  });
}

template <typename scalar_t, bool kHasEps, bool kHasGradZ>
void backward_sweep(const Segments& segments, const scalar_t* grad_z, const scalar_t* grad_kl,
                    int64_t grad_kl_stride, acc_type<scalar_t> kl_grad_factor, const scalar_t* mu,
                    const scalar_t* logvar, const scalar_t* eps, uint64_t seed, scalar_t* grad_mu,
                    scalar_t* grad_logvar) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  at::parallel_for(0, segments.count(), segments.grain(), [&](int64_t first_segment, int64_t last_segment) {
    NoiseBuffer noise_buffer;
    const Vec half(acc_t(0.5));
    const Vec one(acc_t(1));
    for (int64_t segment = first_segment; segment < last_segment; ++segment) {
      const int64_t begin = segments.begin(segment);
      const int64_t end = segments.end(segment);
      const acc_t kl_grad =
          grad_kl == nullptr
              ? acc_t(0)
              : static_cast<acc_t>(grad_kl[segments.sample(segment) * grad_kl_stride]) * kl_grad_factor;
      const Vec kl_grad_values(kl_grad);
      for (int64_t piece = begin; piece < end; piece += kNoisePiece) {
        const int64_t piece_end = std::min(piece + kNoisePiece, end);
        const float* noise = nullptr;
        if constexpr (kHasGradZ && !kHasEps) {
          noise = noise_buffer.fill(seed, piece, piece_end - piece);
        }
        int64_t i = piece;
        for (; i + Vec::size() <= piece_end; i += Vec::size()) {
          const Vec mu_values = load_acc(mu + i);
          const Vec logvar_values = load_acc(logvar + i);
          const Vec std_values = (half * logvar_values).exp();
          Vec grad_mu_values = kl_grad_values * mu_values;
          Vec grad_logvar_values = kl_grad_values * (std_values * std_values - one);
          if constexpr (kHasGradZ) {
            const Vec grad_z_values = load_acc(grad_z + i);
            const Vec noise_values = kHasEps ? load_acc(eps + i) : load_noise<acc_t>(noise + (i - piece));
            grad_mu_values += grad_z_values;
            grad_logvar_values = at::vec::fmadd(grad_z_values * noise_values, std_values, grad_logvar_values);
          }
          store_acc(grad_mu + i, grad_mu_values);
          store_acc(grad_logvar + i, half * grad_logvar_values);
        }
        for (; i < piece_end; ++i) {
          const acc_t mu_value = static_cast<acc_t>(mu[i]);
          const acc_t logvar_value = static_cast<acc_t>(logvar[i]);
          const acc_t std_value = std::exp(acc_t(0.5) * logvar_value);
          acc_t grad_z_value = 0;
          acc_t noise_value = 0;
          if constexpr (kHasGradZ) {
            grad_z_value = static_cast<acc_t>(grad_z[i]);
            noise_value = kHasEps ? static_cast<acc_t>(eps[i]) : static_cast<acc_t>(noise[i - piece]);
          }
          grad_mu[i] = static_cast<scalar_t>(math::grad_mu<acc_t>(grad_z_value, kl_grad, mu_value));
          grad_logvar[i] =
              static_cast<scalar_t>(math::grad_logvar<acc_t>(grad_z_value, kl_grad, noise_value, std_value));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> reparameterize_kl_forward(const at::Tensor& mu, const at::Tensor& logvar,
                                                             const c10::optional<at::Tensor>& eps,
                                                             const c10::optional<at::Tensor>& seed, double beta,
                                                             c10::string_view reduction_name) {
  check_inputs(kForwardName, mu, logvar, eps);
  const Reduction reduction = parse_reduction(reduction_name);
  const at::Tensor mu_dense = batch_major(mu);
  const at::Tensor logvar_dense = in_layout_of(logvar, mu_dense);
  const at::Tensor eps_dense = eps.has_value() ? in_layout_of(*eps, mu_dense) : at::Tensor();
  const uint64_t seed_value = eps.has_value() ? 0 : read_seed(seed, kForwardName);
  at::Tensor z = at::empty_like(mu_dense);
  const int64_t samples = mu_dense.size(0);
  const int64_t per_sample = samples == 0 ? 0 : mu_dense.numel() / samples;
  at::Tensor kl = reduction == Reduction::kNone ? at::empty({samples}, mu.options()) : at::empty({}, mu.options());
  const Segments segments(samples, per_sample);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mu.scalar_type(), kForwardName, [&] {
    using acc_t = acc_type<scalar_t>;
    std::vector<acc_t> segment_sums(static_cast<size_t>(segments.count()), acc_t(0));
    if (per_sample > 0) {
      const scalar_t* eps_data = eps.has_value() ? eps_dense.const_data_ptr<scalar_t>() : nullptr;
      (eps.has_value() ? forward_sweep<scalar_t, true> : forward_sweep<scalar_t, false>)(
          segments, mu_dense.const_data_ptr<scalar_t>(), logvar_dense.const_data_ptr<scalar_t>(), eps_data,
          seed_value, z.mutable_data_ptr<scalar_t>(), segment_sums.data());
    }
    // Per-sample KL = -0.5 * beta * (its segment sums, in order); then the samples in order.
    const acc_t per_sample_factor = static_cast<acc_t>(-0.5 * beta);
    scalar_t* kl_data = kl.mutable_data_ptr<scalar_t>();
    acc_t total = 0;
    for (int64_t sample = 0; sample < samples; ++sample) {
      acc_t sample_sum = 0;
      for (int64_t part = 0; part < segments.per_sample_segments; ++part) {
        sample_sum += segment_sums[sample * segments.per_sample_segments + part];
      }
      if (reduction == Reduction::kNone) {
        kl_data[sample] = static_cast<scalar_t>(per_sample_factor * sample_sum);
      } else {
        total += sample_sum;
      }
    }
    if (reduction != Reduction::kNone) {
      const acc_t factor = static_cast<acc_t>(reduction_factor(reduction, samples, per_sample));
      kl_data[0] = static_cast<scalar_t>(per_sample_factor * total * factor);
    }
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor> reparameterize_kl_backward(
    const c10::optional<at::Tensor>& grad_z, const c10::optional<at::Tensor>& grad_kl, const at::Tensor& mu,
    const at::Tensor& logvar, const c10::optional<at::Tensor>& eps, const c10::optional<at::Tensor>& seed,
    double beta, c10::string_view reduction_name) {
  check_inputs(kBackwardName, mu, logvar, eps);
  const Reduction reduction = parse_reduction(reduction_name);
  const at::Tensor mu_dense = batch_major(mu);
  const at::Tensor logvar_dense = in_layout_of(logvar, mu_dense);
  const int64_t samples = mu_dense.size(0);
  const int64_t per_sample = samples == 0 ? 0 : mu_dense.numel() / samples;
  at::Tensor grad_z_dense;
  if (grad_z.has_value()) {
    check_same_shape_and_dtype(kBackwardName, *grad_z, "grad_z", mu, "mu");
    grad_z_dense = in_layout_of(*grad_z, mu_dense);
  }
  if (grad_kl.has_value()) {
    const bool per_sample_kl = reduction == Reduction::kNone;
    TORCH_CHECK(per_sample_kl ? (grad_kl->dim() == 1 && grad_kl->size(0) == samples) : grad_kl->dim() == 0,
                kBackwardName, ": grad_kl must have shape ", per_sample_kl ? "(batch,)" : "()", ", got ",
                grad_kl->sizes());
    TORCH_CHECK(grad_kl->scalar_type() == mu.scalar_type() && grad_kl->device() == mu.device(), kBackwardName,
                ": grad_kl must have mu's dtype and device");
  }
  const bool needs_noise = grad_z.has_value();
  at::Tensor eps_dense;
  uint64_t seed_value = 0;
  if (needs_noise) {
    if (eps.has_value()) {
      eps_dense = in_layout_of(*eps, mu_dense);
    } else {
      seed_value = read_seed(seed, kBackwardName);
    }
  }
  at::Tensor grad_mu = at::empty_like(mu_dense);
  at::Tensor grad_logvar = at::empty_like(mu_dense);
  if (per_sample == 0) {
    return {grad_mu, grad_logvar};
  }
  const Segments segments(samples, per_sample);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mu.scalar_type(), kBackwardName, [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t kl_grad_factor = static_cast<acc_t>(beta * reduction_factor(reduction, samples, per_sample));
    const scalar_t* grad_kl_data = grad_kl.has_value() ? grad_kl->const_data_ptr<scalar_t>() : nullptr;
    const int64_t grad_kl_stride = grad_kl.has_value() && grad_kl->dim() == 1 ? grad_kl->stride(0) : 0;
    const scalar_t* grad_z_data = needs_noise ? grad_z_dense.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* eps_data = eps_dense.defined() ? eps_dense.const_data_ptr<scalar_t>() : nullptr;
    auto sweep = !needs_noise          ? backward_sweep<scalar_t, true, false>
                 : eps_dense.defined() ? backward_sweep<scalar_t, true, true>
                                       : backward_sweep<scalar_t, false, true>;
    sweep(segments, grad_z_data, grad_kl_data, grad_kl_stride, kl_grad_factor, mu_dense.const_data_ptr<scalar_t>(),
          logvar_dense.const_data_ptr<scalar_t>(), eps_data, seed_value, grad_mu.mutable_data_ptr<scalar_t>(),
          grad_logvar.mutable_data_ptr<scalar_t>());
  });
  return {grad_mu, grad_logvar};
}

}  // namespace

TORCH_LIBRARY_IMPL(imggen_fast, CPU, m) {
  m.impl("reparameterize_kl_forward", &reparameterize_kl_forward);
  m.impl("reparameterize_kl_backward", &reparameterize_kl_backward);
}

}  // namespace imggen_fast::cpu
