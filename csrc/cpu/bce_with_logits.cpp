// CPU kernels of binary cross-entropy with logits and of the GAN discriminator loss.
//
// The forward is one vectorized, parallel sweep that reduces the loss (fixed blocks,
// fixed order: deterministic) and, when asked, writes the gradient for grad_output = 1
// in the same sweep; the backward op scales that stored gradient by grad_output into a
// new tensor, when the autograd's in-place scaling cannot be used (why the gradient is
// stored rather than recomputed: imggen_fast/ops/bce_with_logits.py).
//
// Operands are read as flat arrays over the input's dense memory (contiguous or
// channels_last, never copied): the target has the input's shape; weight and
// pos_weight broadcast and are read periodically (csrc/layout.h, periodic_operand).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/vec_n.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "../backend.h"
#include "../bce_with_logits.h"
#include "cpu_utils.h"

namespace imggen_fast::cpu {
namespace {

// Elements summed into one partial sum. Fixed, so the partials, and the order in which
// they are added, are the same whatever the number of threads.
constexpr int64_t kReductionBlock = 4096;
constexpr int64_t kReductionGrainBlocks = (kElementwiseGrain + kReductionBlock - 1) / kReductionBlock;

// Periodic operands shorter than this are tiled up to it once per call, so the sweep
// runs full vectors between wraps (a per-class pos_weight of 10 classes, say).
constexpr int64_t kMinimumPeriod = 1024;

// Vectors processed together, one operation at a time across all of them: the exp and
// log1p below are chains of ~25 dependent instructions, longer than a core's
// out-of-order window can overlap one vector at a time (measured on Zen 1, fp32, one
// thread, cycles per 8 elements: the loss sweep 37.6 -> 29.6, the loss-and-gradient
// sweep 40.5 -> 32.6; packs of 2 were slower than 4).
constexpr int kPackVectors = 4;
template <typename acc_t>
using Pack = at::vec::VectorizedN<acc_t, kPackVectors>;

template <typename V>
struct is_pack : std::false_type {};
template <typename T, int N>
struct is_pack<at::vec::VectorizedN<T, N>> : std::true_type {};

// Loads / stores a Vec or a Pack of elements starting at `data`, in the accumulation type.
template <typename V, typename scalar_t>
C10_ALWAYS_INLINE V load(const scalar_t* data) {
  if constexpr (is_pack<V>::value) {
    V values;
    for (int k = 0; k < kPackVectors; ++k) {
      values[k] = load_acc(data + k * AccVec<scalar_t>::size());
    }
    return values;
  } else {
    return load_acc(data);
  }
}

template <typename scalar_t, typename V>
C10_ALWAYS_INLINE void store(scalar_t* data, const V& values) {
  if constexpr (is_pack<V>::value) {
    for (int k = 0; k < kPackVectors; ++k) {
      store_acc(data + k * AccVec<scalar_t>::size(), values[k]);
    }
  } else {
    store_acc(data, values);
  }
}

using VecF = at::vec::Vectorized<float>;
using PackF = Pack<float>;

// The float math below replaces Sleef's expf and log1pf, which made the sweep several
// times slower than memory: it only has to cover exp(-|x|) and log1p of a number in
// [0, 1]. Polynomials: minimax fits. Largest relative errors measured against float64:
// exp(-|x|) 2.1e-7, log1p(exp(-|x|)) 4.7e-7, sigmoid(-|x|) 3.4e-7, the loss with a soft
// label 3.3e-7 (torch's own float32 loss: 3.2e-7).

// 2^n from the float whose low mantissa bits hold n + 127 (see fast_exp_minus_abs): those
// bits shifted into the exponent field.
C10_ALWAYS_INLINE VecF exponent_field(const VecF& biased) {
#if defined(CPU_CAPABILITY_AVX2)
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(biased), 23));
#elif defined(CPU_CAPABILITY_AVX512)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(biased), 23));
#else
  return at::vec::cast<float>(at::vec::cast<int32_t>(biased) << at::vec::Vectorized<int32_t>(23));
#endif
}

C10_ALWAYS_INLINE PackF exponent_field(const PackF& biased) {
  PackF result;
  for (int k = 0; k < kPackVectors; ++k) {
    result[k] = exponent_field(biased[k]);
  }
  return result;
}

// exp(-|x|) for floats: 2^n * exp(r), n = round(-|x| / ln 2), r = -|x| - n ln 2 (two-part
// ln 2, so r stays exact for every n), exp(r) by a degree-5 polynomial. n comes from the
// rounding of one fused multiply-add onto 1.5 * 2^23 + 127, whose low mantissa bits then
// hold n + 127. -|x| is clamped at -87 (2^n stays a normal float; exp(-87) = 1.6e-38
// stands in for anything smaller, which no float sum or sigmoid can tell apart); NaN
// passes through.
template <typename V>
C10_ALWAYS_INLINE V fast_exp_minus_abs(const V& x) {
  const V magic(12582912.0f + 127.0f);
  const V z = at::vec::clamp_min(x | V(-0.0f), V(-87.0f));
  const V biased = at::vec::fmadd(z, V(1.44269504088896341f), magic);
  const V n = biased - magic;
  const V r = at::vec::fmadd(n, V(2.12194440e-4f), at::vec::fmadd(n, V(-0.693359375f), z));
  const V r2 = r * r;
  const V low = at::vec::fmadd(V(0.1666711441303126f), r, V(0.4999923165891584f));
  const V high = at::vec::fmadd(V(0.008312533930116677f), r, V(0.04189012772481123f));
  const V exp_r = at::vec::fmadd(at::vec::fmadd(high, r2, low), r2, r + V(1.0f));
  return exp_r * exponent_field(biased);
}

// log1p(t) for floats t in [0, 1] (t = exp(-|x|)), from s = t / (2 + t) in [0, 1/3]:
// 2 atanh(s) = 2 s + 2 s^3 R(s^2) with R quadratic; accurate at small t too (1 + t is
// never rounded).
template <typename V>
C10_ALWAYS_INLINE V log1p_from_ratio(const V& s) {
  const V s2 = s * s;
  const V r = at::vec::fmadd(at::vec::fmadd(V(0.16998761672838472f), s2, V(0.19816903092004673f)), s2,
                             V(0.33336778970287273f));
  const V two_s = s + s;
  return at::vec::fmadd(two_s * s2, r, two_s);
}

// softplus(-|x|) = log1p(exp(-|x|)) alone (the loss without its gradient), and together
// with sigmoid(-|x|) = t / (1 + t), t = exp(-|x|). Floats share one division:
// with q = t / ((1 + t)(2 + t)), t / (2 + t) = q (1 + t) and t / (1 + t) = q (2 + t)
// (measured: 31.9 instead of 35.4 cycles per 8 elements; the divider is the slowest unit).
template <typename V>
struct SoftplusSigmoid {
  V softplus;
  V sigmoid;
};

template <typename V>
C10_ALWAYS_INLINE V softplus_minus_abs(const V& x) {
  if constexpr (std::is_same_v<typename V::value_type, double>) {
    return x.abs().neg().exp().log1p();
  } else {
    const V t = fast_exp_minus_abs(x);
    return log1p_from_ratio(t / (t + V(2.0f)));
  }
}

template <typename V>
C10_ALWAYS_INLINE SoftplusSigmoid<V> softplus_sigmoid_minus_abs(const V& x) {
  if constexpr (std::is_same_v<typename V::value_type, double>) {
    const V t = x.abs().neg().exp();
    return {t.log1p(), t / (V(1) + t)};
  } else {
    const V t = fast_exp_minus_abs(x);
    const V one_plus_t = t + V(1.0f);
    const V two_plus_t = t + V(2.0f);
    const V q = t / (one_plus_t * two_plus_t);
    return {log1p_from_ratio(q * one_plus_t), q * two_plus_t};
  }
}

// The vector forms of csrc/bce_with_logits.h (same formulas, same branches) for a Vec or
// a Pack, from softplus(-|x|) and sigmoid(-|x|): loss_from(x, y[, weight, pos_weight])
// and grad_from(x, y[, weight, pos_weight]).
// linear_term of csrc/bce_with_logits.h: (1 - y) x for x >= 0, -p y x below, NaN at -inf.
template <typename V>
C10_ALWAYS_INLINE V linear_term(const V& x, const V& y, const V& pos_weight_times_y) {
  using value_t = typename V::value_type;
  const V linear = V::blendv(pos_weight_times_y * x.neg(), (V(1) - y) * x, x >= V(0));
  return V::blendv(linear, V(std::numeric_limits<value_t>::quiet_NaN()),
                   x == V(-std::numeric_limits<value_t>::infinity()));
}

template <typename V>
C10_ALWAYS_INLINE V loss_from(const V& softplus, const V& x, const V& y) {
  return linear_term(x, y, y) + softplus;
}

template <typename V>
C10_ALWAYS_INLINE V loss_from(const V& softplus, const V& x, const V& y, const V& weight, const V& pos_weight) {
  const V one(1);
  const V log_weight = at::vec::fmadd(pos_weight - one, y, one);
  return weight * at::vec::fmadd(log_weight, softplus, linear_term(x, y, pos_weight * y));
}

template <typename V>
C10_ALWAYS_INLINE V grad_from(const V& sigmoid, const V& x, const V& y) {
  return V::blendv(sigmoid - y, (V(1) - y) - sigmoid, x >= V(0));
}

template <typename V>
C10_ALWAYS_INLINE V grad_from(const V& sigmoid, const V& x, const V& y, const V& weight, const V& pos_weight) {
  const V one(1);
  const V small_side = at::vec::fmadd(pos_weight - one, y, one) * sigmoid;
  return weight * V::blendv(small_side - pos_weight * y, (one - y) - small_side, x >= V(0));
}

template <typename scalar_t>
using Sweep = BceSweep<scalar_t, acc_type<scalar_t>>;

// Calls body(begin, end, weight, pos_weight) for the runs of [begin, end) along which
// the periodic operands do not wrap (weight[k], pos_weight[k] belong to element begin + k).
template <typename scalar_t, typename Body>
C10_ALWAYS_INLINE void for_each_run(const Sweep<scalar_t>& sweep, int64_t begin, int64_t end, const Body& body) {
  if (sweep.weight == nullptr) {
    body(begin, end, static_cast<const scalar_t*>(nullptr), static_cast<const scalar_t*>(nullptr));
    return;
  }
  for (int64_t i = begin; i < end;) {
    const int64_t weight_offset = i % sweep.weight_period;
    const int64_t pos_weight_offset = i % sweep.pos_weight_period;
    const int64_t run_end = std::min({end, i + sweep.weight_period - weight_offset,
                                       i + sweep.pos_weight_period - pos_weight_offset});
    body(i, run_end, sweep.weight + weight_offset, sweep.pos_weight + pos_weight_offset);
    i = run_end;
  }
}

// Loads the operands of every element of [begin, end) in the accumulation type and calls
// on_vector(i, x, y[, weight, pos_weight]) for each Pack, then each Vec, starting at i
// (the operands are Packs or Vecs), and on_scalar(i, x, y[, weight, pos_weight]) for
// the elements left over at the end of a run.
template <bool kTargetTensor, bool kWeighted, typename scalar_t, typename OnVector, typename OnScalar>
C10_ALWAYS_INLINE void sweep_elements(const Sweep<scalar_t>& sweep, int64_t begin, int64_t end,
                                      const OnVector& on_vector, const OnScalar& on_scalar) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  for_each_run(sweep, begin, end, [&](int64_t run_begin, int64_t run_end, const scalar_t* weight,
                                      const scalar_t* pos_weight) C10_ALWAYS_INLINE_ATTRIBUTE {
    auto visit = [&](auto width, int64_t i) C10_ALWAYS_INLINE_ATTRIBUTE {
      using V = typename decltype(width)::type;
      const V x = load<V>(sweep.input + i);
      V y(sweep.target_value);
      if constexpr (kTargetTensor) {
        y = load<V>(sweep.target + i);
      }
      if constexpr (kWeighted) {
        on_vector(i, x, y, load<V>(weight + (i - run_begin)), load<V>(pos_weight + (i - run_begin)));
      } else {
        on_vector(i, x, y);
      }
    };
    constexpr int64_t kPackSize = kPackVectors * Vec::size();
    int64_t i = run_begin;
    for (; i + kPackSize <= run_end; i += kPackSize) {
      visit(std::type_identity<Pack<acc_t>>{}, i);
    }
    for (; i + Vec::size() <= run_end; i += Vec::size()) {
      visit(std::type_identity<Vec>{}, i);
    }
    for (; i < run_end; ++i) {
      const acc_t x = static_cast<acc_t>(sweep.input[i]);
      const acc_t y = kTargetTensor ? static_cast<acc_t>(sweep.target[i]) : sweep.target_value;
      if constexpr (kWeighted) {
        on_scalar(i, x, y, static_cast<acc_t>(weight[i - run_begin]), static_cast<acc_t>(pos_weight[i - run_begin]));
      } else {
        on_scalar(i, x, y);
      }
    }
  });
}

// The sweep of elements [begin, end): losses written (loss_out) or summed (returned, in
// one fixed order: the Pack lanes, the Vec lanes, the lanes added together, then the
// elements left over at run ends), gradients written when grad_out is set. Each
// combination of the flags is its own instantiation.
template <bool kTargetTensor, bool kWeighted, bool kWriteLoss, bool kWriteGrad, typename scalar_t>
acc_type<scalar_t> sweep_range(const Sweep<scalar_t>& sweep, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  Pack<acc_t> pack_sum(0);
  Vec vector_sum(0);
  acc_t scalar_sum = 0;
  sweep_elements<kTargetTensor, kWeighted>(
      sweep, begin, end,
      [&](int64_t i, const auto& x, const auto&... operands) C10_ALWAYS_INLINE_ATTRIBUTE {
        using V = std::decay_t<decltype(x)>;
        V losses;
        if constexpr (kWriteGrad) {
          const SoftplusSigmoid<V> values = softplus_sigmoid_minus_abs(x);
          losses = loss_from(values.softplus, x, operands...);
          store(sweep.grad_out + i, V(sweep.grad_scale) * grad_from(values.sigmoid, x, operands...));
        } else {
          losses = loss_from(softplus_minus_abs(x), x, operands...);
        }
        if constexpr (kWriteLoss) {
          store(sweep.loss_out + i, losses);
        } else if constexpr (is_pack<V>::value) {
          pack_sum = pack_sum + losses;
        } else {
          vector_sum = vector_sum + losses;
        }
      },
      [&](int64_t i, auto... operands) {
        const acc_t loss = math::bce_with_logits_loss<acc_t>(operands...);
        if constexpr (kWriteGrad) {
          sweep.grad_out[i] = static_cast<scalar_t>(sweep.grad_scale * math::bce_with_logits_grad<acc_t>(operands...));
        }
        if constexpr (kWriteLoss) {
          sweep.loss_out[i] = static_cast<scalar_t>(loss);
        } else {
          scalar_sum += loss;
        }
      });
  auto add = [](const Vec& a, const Vec& b) { return a + b; };
  return at::vec::vec_reduce_all<acc_t>(add, pack_sum) + at::vec::vec_reduce_all<acc_t>(add, vector_sum) +
         scalar_sum;
}

// sweep_range with the flags read from the sweep.
template <typename scalar_t>
acc_type<scalar_t> sweep_range(const Sweep<scalar_t>& sweep, int64_t begin, int64_t end) {
  const auto flag = [](bool value) {
    return value ? std::variant<std::false_type, std::true_type>(std::true_type{})
                 : std::variant<std::false_type, std::true_type>(std::false_type{});
  };
  return std::visit(
      [&](auto target_tensor, auto weighted, auto write_loss, auto write_grad) {
        return sweep_range<decltype(target_tensor)::value, decltype(weighted)::value, decltype(write_loss)::value,
                           decltype(write_grad)::value>(sweep, begin, end);
      },
      flag(sweep.target != nullptr), flag(sweep.weight != nullptr), flag(sweep.loss_out != nullptr),
      flag(sweep.grad_out != nullptr));
}

// Pairwise sum of `count` partial sums, in a fixed order.
template <typename acc_t>
acc_t pairwise_sum(const acc_t* values, int64_t count) {
  if (count <= 8) {
    acc_t sum = 0;
    for (int64_t k = 0; k < count; ++k) {
      sum += values[k];
    }
    return sum;
  }
  const int64_t half = count / 2;
  return pairwise_sum(values, half) + pairwise_sum(values + half, count - half);
}

int64_t block_count(int64_t numel) {
  return (numel + kReductionBlock - 1) / kReductionBlock;
}

// Runs several sweeps in one parallel loop. Reduced (loss_out null): every sweep cut into
// blocks of kReductionBlock elements, each block's partial sum computed by one thread,
// then each sweep's partials added pairwise; returns the sums. Elementwise: chunks of
// kElementwiseGrain over the concatenated elements; returns zeros.
template <typename scalar_t, size_t kCount>
std::array<acc_type<scalar_t>, kCount> run_sweeps(const std::array<Sweep<scalar_t>, kCount>& sweeps) {
  using acc_t = acc_type<scalar_t>;
  std::array<acc_t, kCount> sums{};
  std::array<int64_t, kCount + 1> first{};  // first element (elementwise) or block (reduced) of each sweep
  const bool reduced = sweeps[0].loss_out == nullptr;
  for (size_t k = 0; k < kCount; ++k) {
    first[k + 1] = first[k] + (reduced ? block_count(sweeps[k].numel) : sweeps[k].numel);
  }
  const int64_t total = first[kCount];
  if (!reduced) {
    at::parallel_for(0, total, kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for (size_t k = 0; k < kCount; ++k) {
        const int64_t sweep_begin = std::max(begin, first[k]);
        const int64_t sweep_end = std::min(end, first[k + 1]);
        if (sweep_begin < sweep_end) {
          sweep_range(sweeps[k], sweep_begin - first[k], sweep_end - first[k]);
        }
      }
    });
    return sums;
  }
  auto block_sum = [&](int64_t block) -> acc_t {
    size_t k = 0;
    while (block >= first[k + 1]) {
      ++k;
    }
    const int64_t begin = (block - first[k]) * kReductionBlock;
    return sweep_range(sweeps[k], begin, std::min(sweeps[k].numel, begin + kReductionBlock));
  };
  if (total <= 1) {  // the overhead-bound case: no buffer, no parallel region
    for (size_t k = 0; k < kCount; ++k) {
      sums[k] = first[k + 1] > first[k] ? block_sum(first[k]) : acc_t(0);
    }
    return sums;
  }
  std::vector<acc_t> partials(total);
  at::parallel_for(0, total, kReductionGrainBlocks, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      partials[block] = block_sum(block);
    }
  });
  for (size_t k = 0; k < kCount; ++k) {
    sums[k] = pairwise_sum(partials.data() + first[k], first[k + 1] - first[k]);
  }
  return sums;
}

// ---------------------------------------------------------------------------------------
// Host side.

// The reduced loss: the sum, divided by the element count for "mean" (NaN for no
// elements, as torch's mean).
template <typename acc_t>
acc_t reduce(acc_t sum, int64_t numel, int64_t reduction) {
  return reduction == kReductionMean ? sum / static_cast<acc_t>(numel) : sum;
}

// ---------------------------------------------------------------------------------------
// The ops.

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
  const BceTensors tensors = bce_tensors(op, input, target, weight, pos_weight, reduction, compute_grad, kMinimumPeriod);
  const int64_t numel = tensors.input.numel();
  at::Tensor loss = reduction == kReductionNone ? tensors.loss : at::empty({}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), op, [&] {
    using acc_t = acc_type<scalar_t>;
    const auto sums = run_sweeps(
        std::array{tensors.sweep<scalar_t, acc_t>(target_value, bce_grad_scale<acc_t>(numel, reduction))});
    if (reduction != kReductionNone) {
      *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(reduce(sums[0], numel, reduction));
    }
  });
  return {loss, compute_grad ? tensors.grad : input.new_empty({0})};
}

// GAN discriminator loss: bce(real, real_label) + bce(fake, fake_label), one parallel loop
// over both. Reduction "none" needs one shape; the two loss tensors are then added (an
// extra pass, for a reduction GAN training does not use).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gan_d_loss_forward(const at::Tensor& real_logits,
                                                                  const at::Tensor& fake_logits, double real_label,
                                                                  double fake_label, int64_t reduction,
                                                                  bool compute_grad) {
  if (triton_chosen()) {
    return call_triton<decltype(gan_d_loss_forward)>("gan_d_loss_forward", real_logits, fake_logits, real_label, fake_label, reduction, compute_grad);
  }
  constexpr const char* op = "gan_d_loss_forward";
  check_gan_d_loss_arguments(op, real_logits, fake_logits, reduction);
  const at::Tensor real_input = dense(real_logits);
  // Reduction "none" adds the two losses elementwise: the fake input in the real one's layout.
  const at::Tensor fake_input = reduction == kReductionNone ? in_layout_of(fake_logits, real_input) : dense(fake_logits);
  const BceTensors real = bce_tensors(op, real_input, std::nullopt, std::nullopt, std::nullopt, reduction,
                                      compute_grad, kMinimumPeriod);
  const BceTensors fake = bce_tensors(op, fake_input, std::nullopt, std::nullopt, std::nullopt, reduction,
                                      compute_grad, kMinimumPeriod);
  at::Tensor loss = reduction == kReductionNone ? real.loss : at::empty({}, real_logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, real_logits.scalar_type(), op, [&] {
    using acc_t = acc_type<scalar_t>;
    const auto sums = run_sweeps(std::array{
        real.sweep<scalar_t, acc_t>(real_label, bce_grad_scale<acc_t>(real_input.numel(), reduction)),
        fake.sweep<scalar_t, acc_t>(fake_label, bce_grad_scale<acc_t>(fake_input.numel(), reduction))});
    if (reduction != kReductionNone) {
      *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(reduce(sums[0], real_input.numel(), reduction) +
                                                                 reduce(sums[1], fake_input.numel(), reduction));
    }
  });
  return gan_d_loss_outputs(loss, real, fake, reduction, compute_grad);
}

// grad_output * unit_grad for each stored gradient: grad_output has one element (a
// reduced loss) or the shape of every unit_grad (reduction "none"). One parallel loop
// over all of them; each result in its unit_grad's layout.
std::vector<at::Tensor> bce_with_logits_backward(const at::Tensor& grad_output, at::TensorList unit_grads,
                                                 int64_t reduction) {
  if (triton_chosen()) {
    return call_triton<decltype(bce_with_logits_backward)>("bce_with_logits_backward", grad_output, unit_grads, reduction);
  }
  constexpr const char* op = "bce_with_logits_backward";
  check_reduction(op, reduction);
  std::vector<at::Tensor> units, grad_outputs, results;
  std::vector<int64_t> first{0};
  for (const at::Tensor& unit_grad : unit_grads) {
    check_unit_grad(op, grad_output, unit_grad, reduction);
    units.push_back(dense(unit_grad));
    grad_outputs.push_back(reduction == kReductionNone ? in_layout_of(grad_output, units.back()) : grad_output);
    results.push_back(at::empty_like(units.back()));
    first.push_back(first.back() + unit_grad.numel());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_output.scalar_type(), op, [&] {
    using acc_t = acc_type<scalar_t>;
    using Vec = AccVec<scalar_t>;
    at::parallel_for(0, first.back(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for (size_t k = 0; k < units.size(); ++k) {
        const int64_t offset = first[k];
        const int64_t local_begin = std::max(begin, offset) - offset;
        const int64_t local_end = std::min(end, first[k + 1]) - offset;
        const scalar_t* unit = units[k].const_data_ptr<scalar_t>();
        const scalar_t* grad = grad_outputs[k].const_data_ptr<scalar_t>();  // one value when reduced
        scalar_t* out = results[k].mutable_data_ptr<scalar_t>();
        const acc_t scale = static_cast<acc_t>(grad[0]);
        int64_t i = local_begin;
        for (; i + Vec::size() <= local_end; i += Vec::size()) {
          const Vec factor = reduction == kReductionNone ? load_acc(grad + i) : Vec(scale);
          store_acc(out + i, factor * load_acc(unit + i));
        }
        for (; i < local_end; ++i) {
          const acc_t factor = reduction == kReductionNone ? static_cast<acc_t>(grad[i]) : scale;
          out[i] = static_cast<scalar_t>(factor * static_cast<acc_t>(unit[i]));
        }
      }
    });
  });
  return results;
}

}  // namespace

TORCH_LIBRARY_IMPL(imggen_fast, CPU, m) {
  m.impl("bce_with_logits_forward", &bce_with_logits_forward);
  m.impl("gan_d_loss_forward", &gan_d_loss_forward);
  m.impl("bce_with_logits_backward", &bce_with_logits_backward);
}

}  // namespace imggen_fast::cpu
