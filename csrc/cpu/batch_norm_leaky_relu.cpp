// CPU kernels of the fused BatchNorm + LeakyReLU (math: csrc/batch_norm_leaky_relu.h).
//
// Forward (training): one read pass for the per-channel statistics, then one pass writing
// y = leaky_relu(x * scale + shift); in eval only the second. Backward: one read pass for
// the per-channel sums of g_pre and g_pre * x_hat, then one pass writing grad_x. Each pass
// is at::parallel_for over fixed blocks, with at::vec::Vectorized main loops and scalar
// tails.
//
// Every pass walks memory forwards, in long contiguous runs the hardware prefetchers
// follow (walking the planes backwards, to reread a cached tail first, measured slower:
// the prefetchers lose a descending sequence of ascending runs).
//
// Reductions are deterministic: each channel's elements are cut into blocks by the shape
// alone (Blocks below); each block is reduced in a fixed order, and the blocks are merged
// (statistics) or added (backward sums) in block order. The thread count only decides
// which thread reduces which block, so the bits never depend on it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "../backend.h"
#include "../batch_norm_leaky_relu.h"
#include "cpu_utils.h"

namespace imggen_fast::cpu {
namespace {

using namespace batch_norm_leaky_relu;  // the host helpers shared with the CUDA kernels

// Elements per reduction block, all channels together: a block is a contiguous stretch
// of memory (so the hardware prefetchers stream it), small enough to stay in L2 between
// the two passes of the statistics (256 KiB in fp32).
constexpr int64_t kBlockElements = 65536;

// How the input is cut into reduction blocks: block b covers the planes o in
// [o_begin, o_end) and, in each plane (o, c) of every channel c, the elements i in
// [i_begin, i_end): whole planes (o, 0..C-1) when they fit in a block, else segments of
// them. Fixed by the shape alone, and the same for every channel, so the per-block counts
// are too.
struct Blocks {
  ChannelLayout layout;
  int64_t planes_per_block;
  int64_t segment;            // elements of a plane per block (inner, or a part of it)
  int64_t segments_per_plane;
  int64_t count;

  explicit Blocks(const ChannelLayout& layout) : layout(layout) {
    const int64_t channels = std::max<int64_t>(1, layout.channels);
    const int64_t row = channels * layout.inner;  // one o, every channel
    if (row <= kBlockElements) {
      planes_per_block = kBlockElements / row;
      segment = layout.inner;
    } else {
      planes_per_block = 1;
      segment = std::max<int64_t>(1, kBlockElements / channels);
    }
    segments_per_plane = std::max<int64_t>(1, (layout.inner + segment - 1) / segment);
    count = (layout.outer + planes_per_block - 1) / planes_per_block * segments_per_plane;
  }

  int64_t o_begin(int64_t block) const { return block / segments_per_plane * planes_per_block; }
  int64_t o_end(int64_t block) const { return std::min(layout.outer, o_begin(block) + planes_per_block); }
  int64_t i_begin(int64_t block) const { return block % segments_per_plane * segment; }
  int64_t i_end(int64_t block) const { return std::min(layout.inner, i_begin(block) + segment); }
  // Elements of one channel in the block.
  int64_t elements(int64_t block) const { return (o_end(block) - o_begin(block)) * (i_end(block) - i_begin(block)); }
};

// One accumulation-type value per channel from an optional per-channel tensor of any
// floating dtype and stride (strided, expanded and offset views read correctly), or
// `fallback` for every channel when the tensor is absent.
template <typename acc_t>
std::vector<acc_t> channel_values(const std::optional<at::Tensor>& tensor, int64_t channels, acc_t fallback) {
  std::vector<acc_t> values(static_cast<size_t>(channels), fallback);
  if (!tensor.has_value() || !tensor->defined()) {
    return values;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tensor->scalar_type(), "channel_values", [&] {
    const scalar_t* data = tensor->const_data_ptr<scalar_t>();
    const int64_t stride = tensor->stride(0);
    for (int64_t c = 0; c < channels; ++c) values[c] = static_cast<acc_t>(data[c * stride]);
  });
  return values;
}

// Writes accumulation-type values into a per-channel tensor of any floating dtype and stride.
template <typename acc_t>
void store_channel_values(const at::Tensor& tensor, const std::vector<acc_t>& values) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tensor.scalar_type(), "store_channel_values", [&] {
    scalar_t* data = tensor.mutable_data_ptr<scalar_t>();
    const int64_t stride = tensor.stride(0);
    for (size_t c = 0; c < values.size(); ++c) {
      data[static_cast<int64_t>(c) * stride] = static_cast<scalar_t>(values[c]);
    }
  });
}

template <typename acc_t>
acc_t horizontal_sum(const at::vec::Vectorized<acc_t>& values) {
  return at::vec::vec_reduce_all<acc_t>([](auto& a, auto& b) { return a + b; }, values);
}

// Runs `body(block)` for every block, the blocks spread over the threads in contiguous runs.
template <typename Body>
void for_each_block(const Blocks& blocks, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, kElementwiseGrain / kBlockElements);
  at::parallel_for(0, blocks.count, grain, [&](int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) body(block);
  });
}

// Runs `segment(start, c)` for each plane segment of `block`, in memory order: start is
// the element index of the segment's first element, in plane (o, c).
template <typename Segment>
void for_each_segment(const Blocks& blocks, int64_t block, const Segment& segment) {
  const auto [outer, channels, inner] = blocks.layout;
  for (int64_t o = blocks.o_begin(block); o < blocks.o_end(block); ++o) {
    for (int64_t c = 0; c < channels; ++c) segment((o * channels + c) * inner + blocks.i_begin(block), c);
  }
}

// Runs an elementwise pass: with channels innermost, `row(row)` for each row of C
// elements; else `plane(plane)` for each plane of `inner` elements (plane = o * C + c),
// in memory order.
template <typename Row, typename Plane>
void for_each_row_or_plane(const ChannelLayout& layout, const Row& row, const Plane& plane) {
  const auto [outer, channels, inner] = layout;
  const bool rows = inner == 1;
  const int64_t count = rows ? outer : outer * channels;
  const int64_t grain = std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(1, rows ? channels : inner));
  at::parallel_for(0, count, grain, [&](int64_t first, int64_t last) {
    for (int64_t index = first; index < last; ++index) {
      if (rows) {
        row(index);
      } else {
        plane(index);
      }
    }
  });
}

// The partial sums [block][channel] of one block, zeroed.
template <typename acc_t>
acc_t* zeroed_row(acc_t* partials, int64_t block, int64_t channels) {
  acc_t* row = partials + block * channels;
  std::fill(row, row + channels, acc_t(0));
  return row;
}

// --- forward ----------------------------------------------------------------------------

// Per-block (mean, m2) of every channel, laid out [block][channel]: each block's two
// passes (its mean, then the squared deviations from it) run while it is in cache.
template <typename scalar_t>
void block_moments(const scalar_t* input, const Blocks& blocks, acc_type<scalar_t>* block_mean,
                   acc_type<scalar_t>* block_m2) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t kLanes = Vec::size();
  const auto [outer, channels, inner] = blocks.layout;
  // Rows of C: the per-channel sums kept in the block's partial rows, vectorized across channels.
  auto rows = [&](int64_t block) {
    acc_t* mean = zeroed_row(block_mean, block, channels);
    acc_t* m2 = zeroed_row(block_m2, block, channels);
    const int64_t row_begin = blocks.o_begin(block), row_end = blocks.o_end(block);
    for (int64_t row = row_begin; row < row_end; ++row) {
      const scalar_t* values = input + row * channels;
      int64_t c = 0;
      for (; c + kLanes <= channels; c += kLanes) (Vec::loadu(mean + c) + load_acc(values + c)).store(mean + c);
      for (; c < channels; ++c) mean[c] += static_cast<acc_t>(values[c]);
    }
    const acc_t inverse_rows = acc_t(1) / static_cast<acc_t>(row_end - row_begin);
    for (int64_t c = 0; c < channels; ++c) mean[c] *= inverse_rows;
    for (int64_t row = row_begin; row < row_end; ++row) {
      const scalar_t* values = input + row * channels;
      int64_t c = 0;
      for (; c + kLanes <= channels; c += kLanes) {
        const Vec deviation = load_acc(values + c) - Vec::loadu(mean + c);
        at::vec::fmadd(deviation, deviation, Vec::loadu(m2 + c)).store(m2 + c);
      }
      for (; c < channels; ++c) {
        const acc_t deviation = static_cast<acc_t>(values[c]) - mean[c];
        m2[c] = math::fused_multiply_add(deviation, deviation, m2[c]);
      }
    }
  };
  // Planes: each plane segment reduced to a number, added to its channel's in memory order.
  auto planes = [&](int64_t block) {
    acc_t* mean = zeroed_row(block_mean, block, channels);
    acc_t* m2 = zeroed_row(block_m2, block, channels);
    const int64_t length = blocks.i_end(block) - blocks.i_begin(block);
    for_each_segment(blocks, block, [&](int64_t start, int64_t c) {
      const scalar_t* values = input + start;
      Vec vector_sum(acc_t(0));
      acc_t tail_sum = 0;
      int64_t i = 0;
      for (; i + kLanes <= length; i += kLanes) vector_sum += load_acc(values + i);
      for (; i < length; ++i) tail_sum += static_cast<acc_t>(values[i]);
      mean[c] += horizontal_sum(vector_sum) + tail_sum;
    });
    const acc_t inverse_count = acc_t(1) / static_cast<acc_t>(blocks.elements(block));
    for (int64_t c = 0; c < channels; ++c) mean[c] *= inverse_count;
    for_each_segment(blocks, block, [&](int64_t start, int64_t c) {
      const scalar_t* values = input + start;
      const Vec mean_vector(mean[c]);
      Vec vector_m2(acc_t(0));
      acc_t tail_m2 = 0;
      int64_t i = 0;
      for (; i + kLanes <= length; i += kLanes) {
        const Vec deviation = load_acc(values + i) - mean_vector;
        vector_m2 = at::vec::fmadd(deviation, deviation, vector_m2);
      }
      for (; i < length; ++i) {
        const acc_t deviation = static_cast<acc_t>(values[i]) - mean[c];
        tail_m2 = math::fused_multiply_add(deviation, deviation, tail_m2);
      }
      m2[c] += horizontal_sum(vector_m2) + tail_m2;
    });
  };
  for_each_block(blocks, [&](int64_t block) { inner == 1 ? rows(block) : planes(block); });
}

// The per-channel batch statistics: the blocks' moments merged in block order (vectorized
// across channels; every channel has the same count per block). Returns (mean, biased
// variance) per channel.
template <typename acc_t>
void merge_block_moments(const Blocks& blocks, const acc_t* block_mean, const acc_t* block_m2, acc_t* mean,
                         acc_t* m2) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t channels = blocks.layout.channels;
  std::fill(mean, mean + channels, acc_t(0));
  std::fill(m2, m2 + channels, acc_t(0));
  acc_t count = 0;
  for (int64_t block = 0; block < blocks.count; ++block) {
    const acc_t block_count = static_cast<acc_t>(blocks.elements(block));
    const acc_t total = count + block_count;
    const acc_t block_share = block_count / total;
    const acc_t weight = count * block_share;
    const acc_t* other_mean = block_mean + block * channels;
    const acc_t* other_m2 = block_m2 + block * channels;
    int64_t c = 0;
    for (; c + Vec::size() <= channels; c += Vec::size()) {
      const Vec delta = Vec::loadu(other_mean + c) - Vec::loadu(mean + c);
      (Vec::loadu(mean + c) + delta * Vec(block_share)).store(mean + c);
      (Vec::loadu(m2 + c) + (Vec::loadu(other_m2 + c) + delta * delta * Vec(weight))).store(m2 + c);
    }
    for (; c < channels; ++c) {
      acc_t channel_count = count;
      math::merge_moments(channel_count, mean[c], m2[c], block_count, other_mean[c], other_m2[c]);
    }
    count = total;
  }
}

// y = leaky_relu(x * scale + shift) for every element (output may be input: each element
// is read before it is written).
template <typename scalar_t>
void normalize_activate(const scalar_t* input, scalar_t* output, const ChannelLayout& layout,
                        const acc_type<scalar_t>* scale, const acc_type<scalar_t>* shift, double negative_slope) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t kLanes = Vec::size();
  const auto [outer, channels, inner] = layout;
  const acc_t slope = static_cast<acc_t>(negative_slope);
  // The slope as a vector local to each row / plane, so that it stays in a register.
  auto activate = [](const Vec& x, const Vec& channel_scale, const Vec& channel_shift, const Vec& slope_vector) {
    const Vec pre = at::vec::fmadd(x, channel_scale, channel_shift);
    return Vec::blendv(pre * slope_vector, pre, pre > Vec(0));
  };
  auto scalar = [&](scalar_t x, int64_t c) {
    return static_cast<scalar_t>(math::normalize_activate<acc_t>(static_cast<acc_t>(x), scale[c], shift[c], slope));
  };
  auto row = [&](int64_t row) {
    const scalar_t* x = input + row * channels;
    scalar_t* y = output + row * channels;
    const Vec slope_vector(slope);
    int64_t c = 0;
    for (; c + kLanes <= channels; c += kLanes) {
      store_acc(y + c, activate(load_acc(x + c), Vec::loadu(scale + c), Vec::loadu(shift + c), slope_vector));
    }
    for (; c < channels; ++c) y[c] = scalar(x[c], c);
  };
  auto plane = [&](int64_t plane) {
    const int64_t c = plane % channels;
    const scalar_t* x = input + plane * inner;
    scalar_t* y = output + plane * inner;
    const Vec channel_scale(scale[c]), channel_shift(shift[c]), slope_vector(slope);
    int64_t i = 0;
    for (; i + kLanes <= inner; i += kLanes) {
      store_acc(y + i, activate(load_acc(x + i), channel_scale, channel_shift, slope_vector));
    }
    for (; i < inner; ++i) y[i] = scalar(x[i], c);
  };
  for_each_row_or_plane(layout, row, plane);
}

// The forward on a prepared operand, writing `output` (which may be the operand itself).
// Returns (mean, invstd) in the accumulation type, and updates the running statistics
// in training (not for an empty batch, as torch).
std::tuple<at::Tensor, at::Tensor> forward_into(const Operand& operand, const at::Tensor& output,
                                                const std::optional<at::Tensor>& running_mean,
                                                const std::optional<at::Tensor>& running_var,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias, bool training, double momentum,
                                                double eps, double negative_slope) {
  const at::Tensor& input = operand.tensor;
  const ChannelLayout& layout = operand.layout;
  const int64_t channels = layout.channels;
  const auto accumulation = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean_tensor = at::empty({channels}, input.options().dtype(accumulation));
  at::Tensor invstd_tensor = at::empty({channels}, input.options().dtype(accumulation));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), kForwardName, [&] {
    using acc_t = acc_type<scalar_t>;
    acc_t* mean = mean_tensor.mutable_data_ptr<acc_t>();
    acc_t* invstd = invstd_tensor.mutable_data_ptr<acc_t>();
    const int64_t count = layout.outer * layout.inner;
    if (training) {
      std::vector<acc_t> m2(static_cast<size_t>(channels));
      if (count > 0) {
        const Blocks blocks(layout);
        std::vector<acc_t> block_mean(static_cast<size_t>(blocks.count * channels));
        std::vector<acc_t> block_m2(static_cast<size_t>(blocks.count * channels));
        block_moments(input.const_data_ptr<scalar_t>(), blocks, block_mean.data(), block_m2.data());
        merge_block_moments(blocks, block_mean.data(), block_m2.data(), mean, m2.data());
      } else {
        std::fill(mean, mean + channels, acc_t(0));
      }
      for (int64_t c = 0; c < channels; ++c) {
        invstd[c] = math::inverse_std<acc_t>(count > 0 ? m2[c] / static_cast<acc_t>(count) : acc_t(0),
                                             static_cast<acc_t>(eps));
      }
      if (running_mean.has_value() && running_mean->defined() && count > 0) {
        std::vector<acc_t> new_mean = channel_values<acc_t>(running_mean, channels, acc_t(0));
        std::vector<acc_t> new_var = channel_values<acc_t>(running_var, channels, acc_t(0));
        const acc_t factor = static_cast<acc_t>(momentum);
        for (int64_t c = 0; c < channels; ++c) {
          new_mean[c] = math::running_update(new_mean[c], mean[c], factor);
          new_var[c] = math::running_update(new_var[c], m2[c] / static_cast<acc_t>(count - 1), factor);
        }
        store_channel_values(*running_mean, new_mean);
        store_channel_values(*running_var, new_var);
      }
    } else {
      const std::vector<acc_t> running_means = channel_values<acc_t>(running_mean, channels, acc_t(0));
      const std::vector<acc_t> running_vars = channel_values<acc_t>(running_var, channels, acc_t(1));
      for (int64_t c = 0; c < channels; ++c) {
        mean[c] = running_means[c];
        invstd[c] = math::inverse_std<acc_t>(running_vars[c], static_cast<acc_t>(eps));
      }
    }
    if (input.numel() == 0) {
      return;
    }
    const std::vector<acc_t> weights = channel_values<acc_t>(weight, channels, acc_t(1));
    const std::vector<acc_t> biases = channel_values<acc_t>(bias, channels, acc_t(0));
    std::vector<acc_t> scale(static_cast<size_t>(channels));
    std::vector<acc_t> shift(static_cast<size_t>(channels));
    for (int64_t c = 0; c < channels; ++c) {
      const auto coefficients = math::forward_coefficients(mean[c], invstd[c], weights[c], biases[c]);
      scale[c] = coefficients.scale;
      shift[c] = coefficients.shift;
    }
    normalize_activate(input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), layout, scale.data(),
                       shift.data(), negative_slope);
  });
  return {mean_tensor, invstd_tensor};
}

// --- backward -----------------------------------------------------------------------------

// Per-channel coefficients of the backward (see csrc/batch_norm_leaky_relu.h), in arrays
// the vector loops read.
template <typename acc_t>
struct BackwardChannels {
  std::vector<acc_t> scale, shift;              // the forward's, for the mask read from x
  std::vector<acc_t> value_scale, value_shift;  // x_hat = v * value_scale + value_shift
  std::vector<acc_t> k, p, q;                   // grad_x = g_pre * k + v * p + q

  explicit BackwardChannels(int64_t channels)
      : scale(channels), shift(channels), value_scale(channels), value_shift(channels), k(channels), p(channels),
        q(channels) {}
};

// The per-element values of the backward on Vectorized lanes, (v, g_pre) from the saved
// value (y or x) and the gradient, as math::read_saved computes them. The slopes are
// passed in as vectors the caller holds in locals, so that they stay in registers
// through the loop (members reached through a captured reference are reloaded after
// every store).
template <bool kFromOutput, typename Vec>
inline std::pair<Vec, Vec> read_lanes(const Vec& saved, const Vec& grad, const Vec& scale, const Vec& shift,
                                      const Vec& slope, const Vec& inverse_slope) {
  const Vec zero(0);
  const Vec positive = kFromOutput ? saved > zero : at::vec::fmadd(saved, scale, shift) > zero;
  const Vec value = kFromOutput ? Vec::blendv(saved * inverse_slope, saved, positive) : saved;
  return {value, Vec::blendv(grad * slope, grad, positive)};
}

template <typename acc_t, bool kFromOutput>
struct ScalarRead {
  acc_t slope, inverse_slope;

  std::pair<acc_t, acc_t> operator()(acc_t saved, acc_t grad, acc_t scale, acc_t shift) const {
    const auto read = math::read_saved<acc_t>(kFromOutput, saved, inverse_slope, {scale, shift});
    return {read.value, math::masked_gradient(grad, read.positive, slope)};
  }
};

// Per-block sums of g_pre and g_pre * x_hat of every channel, laid out [block][channel].
template <typename scalar_t, bool kFromOutput>
void block_gradient_sums(const scalar_t* grad_output, const scalar_t* saved, const Blocks& blocks,
                         const BackwardChannels<acc_type<scalar_t>>& channel, acc_type<scalar_t> negative_slope,
                         acc_type<scalar_t> inverse_slope, acc_type<scalar_t>* block_sum_g,
                         acc_type<scalar_t>* block_sum_gx) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t kLanes = Vec::size();
  const auto [outer, channels, inner] = blocks.layout;
  const ScalarRead<acc_t, kFromOutput> read_scalar{negative_slope, inverse_slope};
  // (g_pre, g_pre * x_hat) of one element.
  auto scalar = [&](scalar_t s, scalar_t g, int64_t c) {
    const auto [value, grad_pre] =
        read_scalar(static_cast<acc_t>(s), static_cast<acc_t>(g), channel.scale[c], channel.shift[c]);
    return std::pair<acc_t, acc_t>{
        grad_pre, grad_pre * math::fused_multiply_add(value, channel.value_scale[c], channel.value_shift[c])};
  };
  auto rows = [&](int64_t block) {
    const Vec slope(negative_slope), inverse(inverse_slope);  // in registers (see read_lanes)
    acc_t* sum_g = zeroed_row(block_sum_g, block, channels);
    acc_t* sum_gx = zeroed_row(block_sum_gx, block, channels);
    for (int64_t row = blocks.o_begin(block); row < blocks.o_end(block); ++row) {
      const scalar_t* g = grad_output + row * channels;
      const scalar_t* s = saved + row * channels;
      int64_t c = 0;
      for (; c + kLanes <= channels; c += kLanes) {
        const auto [value, grad_pre] =
            read_lanes<kFromOutput>(load_acc(s + c), load_acc(g + c), Vec::loadu(channel.scale.data() + c),
                                    Vec::loadu(channel.shift.data() + c), slope, inverse);
        const Vec normalized = at::vec::fmadd(value, Vec::loadu(channel.value_scale.data() + c),
                                              Vec::loadu(channel.value_shift.data() + c));
        (Vec::loadu(sum_g + c) + grad_pre).store(sum_g + c);
        at::vec::fmadd(grad_pre, normalized, Vec::loadu(sum_gx + c)).store(sum_gx + c);
      }
      for (; c < channels; ++c) {
        const auto [grad_pre, product] = scalar(s[c], g[c], c);
        sum_g[c] += grad_pre;
        sum_gx[c] += product;
      }
    }
  };
  auto planes = [&](int64_t block) {
    const Vec slope(negative_slope), inverse(inverse_slope);  // in registers (see read_lanes)
    acc_t* sum_g = zeroed_row(block_sum_g, block, channels);
    acc_t* sum_gx = zeroed_row(block_sum_gx, block, channels);
    const int64_t length = blocks.i_end(block) - blocks.i_begin(block);
    for_each_segment(blocks, block, [&](int64_t start, int64_t c) {
      const scalar_t* s = saved + start;
      const scalar_t* g = grad_output + start;
      const Vec scale(channel.scale[c]), shift(channel.shift[c]);
      const Vec value_scale(channel.value_scale[c]), value_shift(channel.value_shift[c]);
      Vec vector_g(acc_t(0)), vector_gx(acc_t(0));
      acc_t tail_g = 0, tail_gx = 0;
      int64_t i = 0;
      for (; i + kLanes <= length; i += kLanes) {
        const auto [value, grad_pre] =
            read_lanes<kFromOutput>(load_acc(s + i), load_acc(g + i), scale, shift, slope, inverse);
        vector_g += grad_pre;
        vector_gx = at::vec::fmadd(grad_pre, at::vec::fmadd(value, value_scale, value_shift), vector_gx);
      }
      for (; i < length; ++i) {
        const auto [grad_pre, product] = scalar(s[i], g[i], c);
        tail_g += grad_pre;
        tail_gx += product;
      }
      sum_g[c] += horizontal_sum(vector_g) + tail_g;
      sum_gx[c] += horizontal_sum(vector_gx) + tail_gx;
    });
  };
  for_each_block(blocks, [&](int64_t block) { inner == 1 ? rows(block) : planes(block); });
}

// grad_x = g_pre * k + v * p + q for every element (grad_input may be grad_output).
template <typename scalar_t, bool kFromOutput>
void input_gradient(const scalar_t* grad_output, const scalar_t* saved, scalar_t* grad_input,
                    const ChannelLayout& layout, const BackwardChannels<acc_type<scalar_t>>& channel,
                    acc_type<scalar_t> negative_slope, acc_type<scalar_t> inverse_slope) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t kLanes = Vec::size();
  const auto [outer, channels, inner] = layout;
  const ScalarRead<acc_t, kFromOutput> read_scalar{negative_slope, inverse_slope};
  auto scalar = [&](scalar_t s, scalar_t g, int64_t c) {
    const auto [value, grad_pre] =
        read_scalar(static_cast<acc_t>(s), static_cast<acc_t>(g), channel.scale[c], channel.shift[c]);
    return static_cast<scalar_t>(
        math::fused_multiply_add(grad_pre, channel.k[c], math::fused_multiply_add(value, channel.p[c], channel.q[c])));
  };
  auto row = [&](int64_t row) {
    const Vec slope(negative_slope), inverse(inverse_slope);  // in registers (see read_lanes)
    const scalar_t* g = grad_output + row * channels;
    const scalar_t* s = saved + row * channels;
    scalar_t* result = grad_input + row * channels;
    int64_t c = 0;
    for (; c + kLanes <= channels; c += kLanes) {
      const auto [value, grad_pre] =
          read_lanes<kFromOutput>(load_acc(s + c), load_acc(g + c), Vec::loadu(channel.scale.data() + c),
                                  Vec::loadu(channel.shift.data() + c), slope, inverse);
      store_acc(result + c, at::vec::fmadd(grad_pre, Vec::loadu(channel.k.data() + c),
                                           at::vec::fmadd(value, Vec::loadu(channel.p.data() + c),
                                                          Vec::loadu(channel.q.data() + c))));
    }
    for (; c < channels; ++c) result[c] = scalar(s[c], g[c], c);
  };
  auto plane = [&](int64_t plane) {
    const Vec slope(negative_slope), inverse(inverse_slope);  // in registers (see read_lanes)
    const int64_t c = plane % channels;
    const scalar_t* g = grad_output + plane * inner;
    const scalar_t* s = saved + plane * inner;
    scalar_t* result = grad_input + plane * inner;
    const Vec scale(channel.scale[c]), shift(channel.shift[c]);
    const Vec k(channel.k[c]), p(channel.p[c]), q(channel.q[c]);
    int64_t i = 0;
    for (; i + kLanes <= inner; i += kLanes) {
      const auto [value, grad_pre] =
          read_lanes<kFromOutput>(load_acc(s + i), load_acc(g + i), scale, shift, slope, inverse);
      store_acc(result + i, at::vec::fmadd(grad_pre, k, at::vec::fmadd(value, p, q)));
    }
    for (; i < inner; ++i) result[i] = scalar(s[i], g[i], c);
  };
  for_each_row_or_plane(layout, row, plane);
}

// Both passes of the backward: the per-channel sums (returned in sum_g, sum_gx), then grad_input.
template <typename scalar_t, bool kFromOutput>
void backward_sweeps(const at::Tensor& grad_output, const Operand& saved, const at::Tensor& grad_input,
                     BackwardChannels<acc_type<scalar_t>>& channel, const std::vector<acc_type<scalar_t>>& weights,
                     const std::vector<acc_type<scalar_t>>& invstd, bool training, double negative_slope,
                     acc_type<scalar_t>* sum_g, acc_type<scalar_t>* sum_gx) {
  using acc_t = acc_type<scalar_t>;
  const ChannelLayout& layout = saved.layout;
  const int64_t channels = layout.channels;
  const acc_t slope = static_cast<acc_t>(negative_slope);
  const acc_t inverse_slope = kFromOutput ? acc_t(1) / slope : acc_t(0);
  std::fill(sum_g, sum_g + channels, acc_t(0));
  std::fill(sum_gx, sum_gx + channels, acc_t(0));
  const scalar_t* grad_data = grad_output.const_data_ptr<scalar_t>();
  const scalar_t* saved_data = saved.tensor.const_data_ptr<scalar_t>();
  const int64_t count = layout.outer * layout.inner;
  if (count > 0) {
    const Blocks blocks(layout);
    std::vector<acc_t> block_g(static_cast<size_t>(blocks.count * channels));
    std::vector<acc_t> block_gx(static_cast<size_t>(blocks.count * channels));
    block_gradient_sums<scalar_t, kFromOutput>(grad_data, saved_data, blocks, channel, slope, inverse_slope,
                                               block_g.data(), block_gx.data());
    for (int64_t block = 0; block < blocks.count; ++block) {
      for (int64_t c = 0; c < channels; ++c) {
        sum_g[c] += block_g[block * channels + c];
        sum_gx[c] += block_gx[block * channels + c];
      }
    }
  }
  if (grad_input.numel() == 0) {
    return;
  }
  for (int64_t c = 0; c < channels; ++c) {
    const auto coefficients = math::input_gradient_coefficients<acc_t>(
        training, static_cast<acc_t>(count), sum_g[c], sum_gx[c], weights[c], invstd[c],
        {channel.value_scale[c], channel.value_shift[c]});
    channel.k[c] = coefficients.k;
    channel.p[c] = coefficients.p;
    channel.q[c] = coefficients.q;
  }
  input_gradient<scalar_t, kFromOutput>(grad_data, saved_data, grad_input.mutable_data_ptr<scalar_t>(), layout,
                                        channel, slope, inverse_slope);
}

// Both backward passes on prepared operands: grad_dense has the saved operand's strides,
// and grad_input (which may be grad_dense itself) too. Returns (grad_weight, grad_bias).
std::tuple<at::Tensor, at::Tensor> backward_into(const at::Tensor& grad_dense, const Operand& saved, bool from_output,
                                                 const at::Tensor& grad_input, const at::Tensor& mean,
                                                 const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                                                 const std::optional<at::Tensor>& bias, bool training,
                                                 double negative_slope) {
  const int64_t channels = saved.layout.channels;
  const auto accumulation = saved.tensor.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sum_g = at::empty({channels}, saved.tensor.options().dtype(accumulation));
  at::Tensor sum_gx = at::empty({channels}, saved.tensor.options().dtype(accumulation));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, saved.tensor.scalar_type(), kBackwardName, [&] {
    using acc_t = acc_type<scalar_t>;
    const std::vector<acc_t> means = channel_values<acc_t>(mean, channels, acc_t(0));
    const std::vector<acc_t> invstds = channel_values<acc_t>(invstd, channels, acc_t(1));
    const std::vector<acc_t> weights = channel_values<acc_t>(weight, channels, acc_t(1));
    const std::vector<acc_t> biases = channel_values<acc_t>(bias, channels, acc_t(0));
    BackwardChannels<acc_t> channel(channels);
    for (int64_t c = 0; c < channels; ++c) {
      const auto forward = math::forward_coefficients(means[c], invstds[c], weights[c], biases[c]);
      const auto normalized = math::normalized_coefficients(from_output, means[c], invstds[c], weights[c], biases[c]);
      channel.scale[c] = forward.scale;
      channel.shift[c] = forward.shift;
      channel.value_scale[c] = normalized.value_scale;
      channel.value_shift[c] = normalized.value_shift;
    }
    (from_output ? backward_sweeps<scalar_t, true> : backward_sweeps<scalar_t, false>)(
        grad_dense, saved, grad_input, channel, weights, invstds, training, negative_slope,
        sum_g.mutable_data_ptr<acc_t>(), sum_gx.mutable_data_ptr<acc_t>());
  });
  const auto parameter_dtype = weight.has_value() && weight->defined() ? weight->scalar_type() : accumulation;
  return {sum_gx.to(parameter_dtype), sum_g.to(parameter_dtype)};
}

// The CPU kernels, for the entries of csrc/batch_norm_leaky_relu.h.
struct CpuPasses {
  static constexpr auto forward_into = cpu::forward_into;
  static constexpr auto backward_into = cpu::backward_into;
};

}  // namespace

TORCH_LIBRARY_IMPL(imggen_fast, CPU, m) {
  batch_norm_leaky_relu::register_kernels<CpuPasses>(m);
}

}  // namespace imggen_fast::cpu
