// CPU kernels of binary cross-entropy with logits and of the GAN discriminator loss:
// one vectorized, parallel sweep over memory per op, deterministic reductions.
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
#include <vector>

#include "../bce_with_logits.h"
#include "cpu_utils.h"

namespace imggen_fast::cpu {
namespace {

// at::Reduction's values, as the schemas pass them.
constexpr int64_t kReductionNone = 0;
constexpr int64_t kReductionMean = 1;

// Elements summed into one partial sum. Fixed, so the partials, and the order in which
// they are added, are the same whatever the number of threads.
constexpr int64_t kReductionBlock = 4096;
constexpr int64_t kReductionGrainBlocks = (kElementwiseGrain + kReductionBlock - 1) / kReductionBlock;

// Periodic operands shorter than this are tiled up to it once per call, so the sweep
// runs full vectors between wraps (a per-class pos_weight of 10 classes, say).
constexpr int64_t kMinimumPeriod = 1024;

// Vectors processed together, one operation at a time across all of them: the exp and
// log1p below are chains of ~25 dependent instructions, longer than a core's
// out-of-order window can overlap one vector at a time (measured on Zen 1, fp32, 1M
// elements, one thread: forward 37.6 -> 29.6 cycles per 8 elements, backward 28.5 -> 23.4).
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
using VecD = at::vec::Vectorized<double>;
using PackD = Pack<double>;

// The float math below replaces Sleef's expf and log1pf, which made the sweep several
// times slower than memory: it only has to cover exp(-|x|) and log1p of a number in
// [0, 1]. Polynomials: minimax fits. Measured against float64: exp(-|x|) within 3.5
// ulp, log1p(exp(-|x|)) within 8 ulp, sigmoid(-|x|) within 7 ulp (torch's Sleef path is
// 1 ulp per function, but its loss formula cancels: 5 ulp on soft labels).

// 2^n from the float whose low mantissa bits hold n + 127 (see exp_minus_abs): those
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

// log1p(t) for floats t in [0, 1] (t = exp(-|x|)): 2 atanh(s) with s = t / (2 + t) in
// [0, 1/3], as 2 s + 2 s^3 R(s^2) with R quadratic; accurate at small t too (1 + t is
// never rounded).
template <typename V>
C10_ALWAYS_INLINE V fast_log1p_unit(const V& t) {
  const V s = t / (t + V(2.0f));
  const V s2 = s * s;
  const V r = at::vec::fmadd(at::vec::fmadd(V(0.16998761672838472f), s2, V(0.19816903092004673f)), s2,
                             V(0.33336778970287273f));
  const V two_s = s + s;
  return at::vec::fmadd(two_s * s2, r, two_s);
}

C10_ALWAYS_INLINE VecF exp_minus_abs(const VecF& x) { return fast_exp_minus_abs(x); }
C10_ALWAYS_INLINE PackF exp_minus_abs(const PackF& x) { return fast_exp_minus_abs(x); }
C10_ALWAYS_INLINE VecF log1p_unit(const VecF& t) { return fast_log1p_unit(t); }
C10_ALWAYS_INLINE PackF log1p_unit(const PackF& t) { return fast_log1p_unit(t); }

// Doubles (not the fast path): Sleef, 1 ulp.
C10_ALWAYS_INLINE VecD exp_minus_abs(const VecD& x) { return x.abs().neg().exp(); }
C10_ALWAYS_INLINE PackD exp_minus_abs(const PackD& x) { return x.abs().neg().exp(); }
C10_ALWAYS_INLINE VecD log1p_unit(const VecD& t) { return t.log1p(); }
C10_ALWAYS_INLINE PackD log1p_unit(const PackD& t) { return t.log1p(); }

// The vector forms of csrc/bce_with_logits.h (same formulas, same branches), for a Vec
// or a Pack.
template <typename V>
C10_ALWAYS_INLINE V sigmoid_minus_abs(const V& x) {
  const V decay = exp_minus_abs(x);
  return decay / (V(1) + decay);
}

template <typename V>
C10_ALWAYS_INLINE V loss(const V& x, const V& y) {
  return (at::vec::clamp_min(x, V(0)) - x * y) + log1p_unit(exp_minus_abs(x));
}

template <typename V>
C10_ALWAYS_INLINE V loss(const V& x, const V& y, const V& weight, const V& pos_weight) {
  const V one(1);
  const V log_weight = at::vec::fmadd(pos_weight - one, y, one);
  const V linear = V::blendv((pos_weight * y) * x.neg(), (one - y) * x, x >= V(0));
  return weight * at::vec::fmadd(log_weight, log1p_unit(exp_minus_abs(x)), linear);
}

template <typename V>
C10_ALWAYS_INLINE V grad(const V& x, const V& y) {
  const V small_side = sigmoid_minus_abs(x);
  return V::blendv(small_side - y, (V(1) - y) - small_side, x >= V(0));
}

template <typename V>
C10_ALWAYS_INLINE V grad(const V& x, const V& y, const V& weight, const V& pos_weight) {
  const V one(1);
  const V log_weight = at::vec::fmadd(pos_weight - one, y, one);
  const V small_side = log_weight * sigmoid_minus_abs(x);
  return weight * V::blendv(small_side - pos_weight * y, (one - y) - small_side, x >= V(0));
}

// One BCE sweep as flat arrays over the input's memory: element i has logit input[i],
// target target[i] (or target_value), weight weight[i % weight_period] and pos_weight
// pos_weight[i % pos_weight_period]. weight == nullptr: unweighted (both absent).
template <typename scalar_t>
struct Sweep {
  const scalar_t* input = nullptr;
  int64_t numel = 0;
  const scalar_t* target = nullptr;
  acc_type<scalar_t> target_value = 0;
  const scalar_t* weight = nullptr;
  int64_t weight_period = 1;
  const scalar_t* pos_weight = nullptr;
  int64_t pos_weight_period = 1;
};

// Calls body(begin, end, weight, pos_weight) for the runs of [begin, end) along which
// the periodic operands do not wrap (weight[k], pos_weight[k] belong to element begin + k).
template <typename scalar_t, typename Body>
inline void for_each_run(const Sweep<scalar_t>& sweep, int64_t begin, int64_t end, const Body& body) {
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
                                      const scalar_t* pos_weight) {
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

// Calls fn(target_is_tensor, weighted) with the two flags as std::integral_constants, so
// each combination is its own instantiation of the sweep.
template <typename scalar_t, typename Fn>
inline void dispatch_sweep(const Sweep<scalar_t>& sweep, const Fn& fn) {
  const bool target_tensor = sweep.target != nullptr;
  const bool weighted = sweep.weight != nullptr;
  if (target_tensor && weighted) {
    fn(std::true_type{}, std::true_type{});
  } else if (target_tensor) {
    fn(std::true_type{}, std::false_type{});
  } else if (weighted) {
    fn(std::false_type{}, std::true_type{});
  } else {
    fn(std::false_type{}, std::false_type{});
  }
}

// Sum of the losses of elements [begin, end), in one fixed order: the Pack lanes, the
// Vec lanes, the lanes added together, then the elements left over at run ends.
template <bool kTargetTensor, bool kWeighted, typename scalar_t>
acc_type<scalar_t> loss_sum(const Sweep<scalar_t>& sweep, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  Pack<acc_t> pack_sum(0);
  Vec vector_sum(0);
  acc_t scalar_sum = 0;
  sweep_elements<kTargetTensor, kWeighted>(
      sweep, begin, end,
      [&](int64_t, const auto&... operands) {
        const auto losses = loss(operands...);
        if constexpr (is_pack<std::decay_t<decltype(losses)>>::value) {
          pack_sum = pack_sum + losses;
        } else {
          vector_sum = vector_sum + losses;
        }
      },
      [&](int64_t, auto... operands) { scalar_sum += math::bce_with_logits_loss<acc_t>(operands...); });
  auto add = [](const Vec& a, const Vec& b) { return a + b; };
  return at::vec::vec_reduce_all<acc_t>(add, pack_sum) + at::vec::vec_reduce_all<acc_t>(add, vector_sum) +
         scalar_sum;
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

// The loss sums of several sweeps: every sweep cut into blocks of kReductionBlock
// elements, all blocks of all sweeps in one parallel loop, each block's partial sum
// computed by one thread, then each sweep's partials added pairwise.
template <typename scalar_t, size_t kCount>
std::array<acc_type<scalar_t>, kCount> loss_sums(const std::array<Sweep<scalar_t>, kCount>& sweeps) {
  using acc_t = acc_type<scalar_t>;
  std::array<int64_t, kCount + 1> first_block{};
  for (size_t k = 0; k < kCount; ++k) {
    first_block[k + 1] = first_block[k] + block_count(sweeps[k].numel);
  }
  auto block_sum = [&](int64_t block) -> acc_t {
    size_t k = 0;
    while (block >= first_block[k + 1]) {
      ++k;
    }
    const Sweep<scalar_t>& sweep = sweeps[k];
    const int64_t begin = (block - first_block[k]) * kReductionBlock;
    const int64_t end = std::min(sweep.numel, begin + kReductionBlock);
    acc_t sum = 0;
    dispatch_sweep(sweep, [&](auto target_tensor, auto weighted) {
      sum = loss_sum<decltype(target_tensor)::value, decltype(weighted)::value>(sweep, begin, end);
    });
    return sum;
  };
  std::array<acc_t, kCount> sums{};
  const int64_t blocks = first_block[kCount];
  if (blocks == 1) {  // the overhead-bound case: no buffer, no parallel region
    for (size_t k = 0; k < kCount; ++k) {
      sums[k] = sweeps[k].numel > 0 ? block_sum(first_block[k]) : acc_t(0);
    }
    return sums;
  }
  std::vector<acc_t> partials(blocks);
  at::parallel_for(0, blocks, kReductionGrainBlocks, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      partials[block] = block_sum(block);
    }
  });
  for (size_t k = 0; k < kCount; ++k) {
    sums[k] = pairwise_sum(partials.data() + first_block[k], first_block[k + 1] - first_block[k]);
  }
  return sums;
}

// out[i] = scale[i] * loss[i] for elements [begin, end) (the loss for reduction="none").
template <typename scalar_t>
void write_losses(const Sweep<scalar_t>& sweep, int64_t begin, int64_t end, scalar_t* out) {
  using acc_t = acc_type<scalar_t>;
  dispatch_sweep(sweep, [&](auto target_tensor, auto weighted) {
    sweep_elements<decltype(target_tensor)::value, decltype(weighted)::value>(
        sweep, begin, end, [&](int64_t i, const auto&... operands) { store(out + i, loss(operands...)); },
        [&](int64_t i, auto... operands) {
          out[i] = static_cast<scalar_t>(math::bce_with_logits_loss<acc_t>(operands...));
        });
  });
}

// grad_input[i] = (grad_output[i] or grad_scale) * d loss / d input[i] for elements [begin, end).
template <typename scalar_t>
void write_grads(const Sweep<scalar_t>& sweep, int64_t begin, int64_t end, const scalar_t* grad_output,
                 acc_type<scalar_t> grad_scale, scalar_t* grad_input) {
  using acc_t = acc_type<scalar_t>;
  dispatch_sweep(sweep, [&](auto target_tensor, auto weighted) {
    sweep_elements<decltype(target_tensor)::value, decltype(weighted)::value>(
        sweep, begin, end,
        [&](int64_t i, const auto&... operands) {
          using V = std::decay_t<decltype(grad(operands...))>;
          const V scale = grad_output != nullptr ? load<V>(grad_output + i) : V(grad_scale);
          store(grad_input + i, scale * grad(operands...));
        },
        [&](int64_t i, auto... operands) {
          const acc_t scale = grad_output != nullptr ? static_cast<acc_t>(grad_output[i]) : grad_scale;
          grad_input[i] = static_cast<scalar_t>(scale * math::bce_with_logits_grad<acc_t>(operands...));
        });
  });
}

// ---------------------------------------------------------------------------------------
// Host side: checks, layouts, operands.

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

// The tensors a BCE sweep reads, kept alive for the sweep, in the input's dense layout.
struct BceOperands {
  at::Tensor input;
  at::Tensor target;  // undefined: a number target
  at::Tensor weight;  // undefined: unweighted
  int64_t weight_period = 1;
  at::Tensor pos_weight;
  int64_t pos_weight_period = 1;

  template <typename scalar_t>
  Sweep<scalar_t> sweep(double target_value) const {
    Sweep<scalar_t> sweep;
    sweep.input = input.const_data_ptr<scalar_t>();
    sweep.numel = input.numel();
    sweep.target = target.defined() ? target.const_data_ptr<scalar_t>() : nullptr;
    sweep.target_value = static_cast<acc_type<scalar_t>>(target_value);
    if (weight.defined()) {
      sweep.weight = weight.const_data_ptr<scalar_t>();
      sweep.weight_period = weight_period;
      sweep.pos_weight = pos_weight.const_data_ptr<scalar_t>();
      sweep.pos_weight_period = pos_weight_period;
    }
    return sweep;
  }
};

// A weight or pos_weight as a periodic flat operand (ones when absent), tiled up to
// kMinimumPeriod elements when its period is shorter and the input longer.
std::pair<at::Tensor, int64_t> tiled_operand(const std::optional<at::Tensor>& operand, const at::Tensor& input) {
  PeriodicOperand periodic = operand.has_value() ? periodic_operand(*operand, input)
                                                 : PeriodicOperand{at::ones({1}, input.options()), 1};
  if (periodic.period < kMinimumPeriod && periodic.period < input.numel()) {
    const int64_t copies = (kMinimumPeriod + periodic.period - 1) / periodic.period;
    return {periodic.values.repeat({copies}), periodic.period * copies};
  }
  return {periodic.values, periodic.period};
}

BceOperands bce_operands(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& target,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight) {
  BceOperands operands;
  operands.input = dense(input);
  if (target.has_value()) {
    check_same_shape_and_dtype(op, *target, "target", input, "input");
    operands.target = in_layout_of(*target, operands.input);
  }
  if (weight.has_value()) {
    check_operand(op, *weight, "weight", input);
  }
  if (pos_weight.has_value()) {
    check_operand(op, *pos_weight, "pos_weight", input);
  }
  if ((weight.has_value() || pos_weight.has_value()) && input.numel() > 0) {
    std::tie(operands.weight, operands.weight_period) = tiled_operand(weight, operands.input);
    std::tie(operands.pos_weight, operands.pos_weight_period) = tiled_operand(pos_weight, operands.input);
  }
  return operands;
}

// A reduced loss: the sum, divided by the element count for "mean" (NaN for no elements,
// as torch's mean).
template <typename acc_t>
acc_t reduce(acc_t sum, int64_t numel, int64_t reduction) {
  return reduction == kReductionMean ? sum / static_cast<acc_t>(numel) : sum;
}

// The value of a one-element grad_output, read where it lies (a CPU tensor: no sync).
template <typename scalar_t>
acc_type<scalar_t> scalar_value(const at::Tensor& tensor) {
  return static_cast<acc_type<scalar_t>>(*tensor.const_data_ptr<scalar_t>());
}

void check_grad_output(const char* op, const at::Tensor& grad_output, const at::Tensor& like, int64_t reduction) {
  TORCH_CHECK(grad_output.scalar_type() == like.scalar_type(), op, ": grad_output dtype ",
              grad_output.scalar_type(), " does not match input dtype ", like.scalar_type());
  if (reduction == kReductionNone) {
    TORCH_CHECK(grad_output.sizes() == like.sizes(), op, ": grad_output shape ", grad_output.sizes(),
                " does not match input shape ", like.sizes());
  } else {
    TORCH_CHECK(grad_output.numel() == 1, op, ": grad_output of a reduced loss must have one element, got shape ",
                grad_output.sizes());
  }
}

// ---------------------------------------------------------------------------------------
// The ops.

at::Tensor bce_with_logits(const at::Tensor& input, const std::optional<at::Tensor>& target, double target_value,
                           const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                           int64_t reduction) {
  constexpr const char* op = "bce_with_logits";
  check_reduction(op, reduction);
  const BceOperands operands = bce_operands(op, input, target, weight, pos_weight);
  const int64_t numel = operands.input.numel();
  at::Tensor result = reduction == kReductionNone ? at::empty_like(operands.input) : at::empty({}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), op, [&] {
    const Sweep<scalar_t> sweep = operands.sweep<scalar_t>(target_value);
    scalar_t* out = result.mutable_data_ptr<scalar_t>();
    if (reduction == kReductionNone) {
      at::parallel_for(0, numel, kElementwiseGrain,
                       [&](int64_t begin, int64_t end) { write_losses(sweep, begin, end, out); });
    } else {
      *out = static_cast<scalar_t>(reduce(loss_sums(std::array{sweep})[0], numel, reduction));
    }
  });
  return result;
}

at::Tensor bce_with_logits_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                    const std::optional<at::Tensor>& target, double target_value,
                                    const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  constexpr const char* op = "bce_with_logits_backward";
  check_reduction(op, reduction);
  check_grad_output(op, grad_output, input, reduction);
  const BceOperands operands = bce_operands(op, input, target, weight, pos_weight);
  const int64_t numel = operands.input.numel();
  at::Tensor grad_input = at::empty_like(operands.input);
  if (numel == 0) {
    return grad_input;
  }
  const at::Tensor grad_dense = reduction == kReductionNone ? in_layout_of(grad_output, operands.input) : grad_output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), op, [&] {
    const Sweep<scalar_t> sweep = operands.sweep<scalar_t>(target_value);
    const scalar_t* grad_data = reduction == kReductionNone ? grad_dense.const_data_ptr<scalar_t>() : nullptr;
    const acc_type<scalar_t> grad_scale =
        reduction == kReductionNone ? 1 : reduce(scalar_value<scalar_t>(grad_output), numel, reduction);
    scalar_t* out = grad_input.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, numel, kElementwiseGrain, [&](int64_t begin, int64_t end) {
      write_grads(sweep, begin, end, grad_data, grad_scale, out);
    });
  });
  return grad_input;
}

// GAN discriminator loss: bce(real, real_label) + bce(fake, fake_label), one parallel loop.
at::Tensor gan_d_loss(const at::Tensor& real_logits, const at::Tensor& fake_logits, double real_label,
                      double fake_label, int64_t reduction) {
  constexpr const char* op = "gan_d_loss";
  check_reduction(op, reduction);
  TORCH_CHECK(real_logits.scalar_type() == fake_logits.scalar_type(), op, ": fake_logits dtype ",
              fake_logits.scalar_type(), " does not match real_logits dtype ", real_logits.scalar_type());
  TORCH_CHECK(reduction != kReductionNone || real_logits.sizes() == fake_logits.sizes(), op,
              ": reduction='none' needs real_logits and fake_logits of one shape, got ", real_logits.sizes(),
              " and ", fake_logits.sizes());
  const at::Tensor real = dense(real_logits);
  const at::Tensor fake = reduction == kReductionNone ? in_layout_of(fake_logits, real) : dense(fake_logits);
  at::Tensor result = reduction == kReductionNone ? at::empty_like(real) : at::empty({}, real.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, real.scalar_type(), op, [&] {
    using acc_t = acc_type<scalar_t>;
    Sweep<scalar_t> real_sweep, fake_sweep;
    real_sweep.input = real.const_data_ptr<scalar_t>();
    real_sweep.numel = real.numel();
    real_sweep.target_value = static_cast<acc_t>(real_label);
    fake_sweep.input = fake.const_data_ptr<scalar_t>();
    fake_sweep.numel = fake.numel();
    fake_sweep.target_value = static_cast<acc_t>(fake_label);
    scalar_t* out = result.mutable_data_ptr<scalar_t>();
    if (reduction != kReductionNone) {
      const auto sums = loss_sums(std::array{real_sweep, fake_sweep});
      *out = static_cast<scalar_t>(reduce(sums[0], real_sweep.numel, reduction) +
                                   reduce(sums[1], fake_sweep.numel, reduction));
      return;
    }
    at::parallel_for(0, real.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      sweep_elements<false, false>(
          real_sweep, begin, end,
          [&](int64_t i, const auto& x, const auto& y) {
            using V = std::decay_t<decltype(x)>;
            store(out + i, loss(x, y) + loss(load<V>(fake_sweep.input + i), V(fake_sweep.target_value)));
          },
          [&](int64_t i, acc_t x, acc_t y) {
            out[i] = static_cast<scalar_t>(
                math::bce_with_logits_loss<acc_t>(x, y) +
                math::bce_with_logits_loss<acc_t>(static_cast<acc_t>(fake_sweep.input[i]), fake_sweep.target_value));
          });
    });
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor> gan_d_loss_backward(const at::Tensor& grad_output, const at::Tensor& real_logits,
                                                       const at::Tensor& fake_logits, double real_label,
                                                       double fake_label, int64_t reduction) {
  constexpr const char* op = "gan_d_loss_backward";
  check_reduction(op, reduction);
  check_grad_output(op, grad_output, real_logits, reduction);
  TORCH_CHECK(real_logits.scalar_type() == fake_logits.scalar_type(), op, ": fake_logits dtype ",
              fake_logits.scalar_type(), " does not match real_logits dtype ", real_logits.scalar_type());
  const at::Tensor real = dense(real_logits);
  const at::Tensor fake = dense(fake_logits);
  at::Tensor grad_real = at::empty_like(real);
  at::Tensor grad_fake = at::empty_like(fake);
  const int64_t real_numel = real.numel();
  const int64_t total = real_numel + fake.numel();
  if (total == 0) {
    return {grad_real, grad_fake};
  }
  const bool elementwise = reduction == kReductionNone;
  const at::Tensor grad_for_real = elementwise ? in_layout_of(grad_output, real) : grad_output;
  const at::Tensor grad_for_fake = elementwise ? in_layout_of(grad_output, fake) : grad_output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, real.scalar_type(), op, [&] {
    using acc_t = acc_type<scalar_t>;
    Sweep<scalar_t> real_sweep, fake_sweep;
    real_sweep.input = real.const_data_ptr<scalar_t>();
    real_sweep.numel = real_numel;
    real_sweep.target_value = static_cast<acc_t>(real_label);
    fake_sweep.input = fake.const_data_ptr<scalar_t>();
    fake_sweep.numel = fake.numel();
    fake_sweep.target_value = static_cast<acc_t>(fake_label);
    const acc_t grad_value = elementwise ? acc_t(1) : scalar_value<scalar_t>(grad_output);
    const acc_t real_scale = elementwise ? acc_t(1) : reduce(grad_value, real_sweep.numel, reduction);
    const acc_t fake_scale = elementwise ? acc_t(1) : reduce(grad_value, fake_sweep.numel, reduction);
    const scalar_t* real_grad_output = elementwise ? grad_for_real.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* fake_grad_output = elementwise ? grad_for_fake.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* real_out = grad_real.mutable_data_ptr<scalar_t>();
    scalar_t* fake_out = grad_fake.mutable_data_ptr<scalar_t>();
    // One parallel loop over the real elements followed by the fake ones.
    at::parallel_for(0, total, kElementwiseGrain, [&](int64_t begin, int64_t end) {
      if (begin < real_numel) {
        write_grads(real_sweep, begin, std::min(end, real_numel), real_grad_output, real_scale, real_out);
      }
      if (end > real_numel) {
        write_grads(fake_sweep, std::max(begin, real_numel) - real_numel, end - real_numel, fake_grad_output,
                    fake_scale, fake_out);
      }
    });
  });
  return {grad_real, grad_fake};
}


// EXPERIMENT (to be removed): the forward sweep that also writes the gradient, scaled by
// 1/N for mean, so that backward is grad_output * stored. Unweighted only; exp shared.
std::tuple<at::Tensor, at::Tensor> bce_with_logits_stored_grad(const at::Tensor& input,
                                                               const std::optional<at::Tensor>& target,
                                                               double target_value, int64_t reduction) {
  const BceOperands operands = bce_operands("stored", input, target, std::nullopt, std::nullopt);
  const int64_t numel = operands.input.numel();
  at::Tensor grad_input = at::empty_like(operands.input);
  at::Tensor result = at::empty({}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "bce_with_logits_stored_grad", [&] {
    using acc_t = acc_type<scalar_t>;
    using Vec = AccVec<scalar_t>;
    const Sweep<scalar_t> sweep = operands.sweep<scalar_t>(target_value);
    scalar_t* gp = grad_input.mutable_data_ptr<scalar_t>();
    const acc_t scale = reduction == kReductionMean ? acc_t(1) / numel : acc_t(1);
    const int64_t blocks = block_count(numel);
    std::vector<acc_t> partials(blocks);
    at::parallel_for(0, blocks, kReductionGrainBlocks, [&](int64_t begin_block, int64_t end_block) {
      for (int64_t block = begin_block; block < end_block; ++block) {
        const int64_t begin = block * kReductionBlock;
        const int64_t end = std::min(numel, begin + kReductionBlock);
        Pack<acc_t> pack_sum(0);
        Vec vector_sum(0);
        acc_t tail = 0;
        dispatch_sweep(sweep, [&](auto target_tensor, auto weighted) {
          if constexpr (!decltype(weighted)::value) {
            sweep_elements<decltype(target_tensor)::value, false>(
                sweep, begin, end,
                [&](int64_t i, const auto& x, const auto& y) {
                  using V = std::decay_t<decltype(x)>;
                  const V t = exp_minus_abs(x);
                  const V losses = (at::vec::clamp_min(x, V(0)) - x * y) + log1p_unit(t);
                  if constexpr (is_pack<V>::value) {
                    pack_sum = pack_sum + losses;
                  } else {
                    vector_sum = vector_sum + losses;
                  }
                  const V small_side = t / (V(1) + t);
                  store(gp + i, V(scale) * V::blendv(small_side - y, (V(1) - y) - small_side, x >= V(0)));
                },
                [&](int64_t i, acc_t x, acc_t y) {
                  tail += math::bce_with_logits_loss<acc_t>(x, y);
                  gp[i] = scale * math::bce_with_logits_grad<acc_t>(x, y);
                });
          }
        });
        auto add = [](const Vec& a, const Vec& b) { return a + b; };
        partials[block] = at::vec::vec_reduce_all<acc_t>(add, pack_sum) +
                          at::vec::vec_reduce_all<acc_t>(add, vector_sum) + tail;
      }
    });
    *result.mutable_data_ptr<scalar_t>() =
        static_cast<scalar_t>(pairwise_sum(partials.data(), blocks) * (reduction == kReductionMean ? scale : 1));
  });
  return {result, grad_input};
}

}  // namespace

TORCH_LIBRARY_IMPL(imggen_fast, CPU, m) {
  m.impl("bce_with_logits", &bce_with_logits);
  m.impl("bce_with_logits_backward", &bce_with_logits_backward);
  m.impl("gan_d_loss", &gan_d_loss);
  m.impl("gan_d_loss_backward", &gan_d_loss_backward);
  m.impl("bce_with_logits_stored_grad", &bce_with_logits_stored_grad);
}

}  // namespace imggen_fast::cpu
