// CPU kernels of the LeakyReLU epilogue, each one vectorized, parallel sweep over memory:
// the forward bias + LeakyReLU in place on a layer's output, the backward mask read
// from the activated output, and the backward mask with the bias gradient summed in
// the same sweep.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/WrapDimMinimal.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../backend.h"
#include "../leaky_relu.h"
#include "cpu_utils.h"

namespace imggen_fast::cpu {
namespace {

at::Tensor leaky_relu_backward_from_output(const at::Tensor& grad_output, const at::Tensor& output,
                                           double negative_slope) {
  if (triton_chosen()) {
    return call_triton<decltype(leaky_relu_backward_from_output)>("leaky_relu_backward_from_output", grad_output, output, negative_slope);
  }
  check_same_shape_and_dtype("leaky_relu_backward_from_output", grad_output, "grad_output", output,
                             "output");
  const at::Tensor output_dense = dense(output);
  const at::Tensor grad_dense = in_layout_of(grad_output, output_dense);
  at::Tensor grad_input = at::empty_like(output_dense);
  const int64_t numel = output_dense.numel();
  if (numel == 0) {
    return grad_input;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, output.scalar_type(), "leaky_relu_backward_from_output", [&] {
        using acc_t = acc_type<scalar_t>;
        using Vec = AccVec<scalar_t>;
        const scalar_t* grad_data = grad_dense.const_data_ptr<scalar_t>();
        const scalar_t* output_data = output_dense.const_data_ptr<scalar_t>();
        scalar_t* result = grad_input.mutable_data_ptr<scalar_t>();
        const acc_t slope = static_cast<acc_t>(negative_slope);
        const Vec slope_vec(slope);
        const Vec zero(acc_t(0));
        at::parallel_for(0, numel, kElementwiseGrain, [&](int64_t begin, int64_t end) {
          int64_t i = begin;
          for (; i + Vec::size() <= end; i += Vec::size()) {
            const Vec grad = load_acc(grad_data + i);
            const Vec out = load_acc(output_data + i);
            store_acc(result + i, Vec::blendv(grad * slope_vec, grad, out > zero));
          }
          for (; i < end; ++i) {
            result[i] = static_cast<scalar_t>(math::leaky_relu_backward_from_output<acc_t>(
                static_cast<acc_t>(grad_data[i]), static_cast<acc_t>(output_data[i]), slope));
          }
        });
      });
  return grad_input;
}


// The bias, as one accumulation-type value per channel (bias may be absent: zeros).
at::Tensor bias_in_accumulation_type(const std::optional<at::Tensor>& bias, const at::Tensor& like,
                                     int64_t channels) {
  const auto acc_dtype = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (!bias.has_value() || !bias->defined()) {
    return at::zeros({channels}, like.options().dtype(acc_dtype));
  }
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == channels, "bias_leaky_relu_: bias must have shape (",
              channels, "), got ", bias->sizes());
  return bias->to(acc_dtype).contiguous();
}

void bias_leaky_relu_(const at::Tensor& output, const std::optional<at::Tensor>& bias, double negative_slope,
                      int64_t channel_dim) {
  if (triton_chosen()) {
    call_triton<decltype(bias_leaky_relu_)>("bias_leaky_relu_", output, bias, negative_slope, channel_dim);
    return;
  }
  channel_dim = c10::maybe_wrap_dim(channel_dim, output.dim());
  const auto layout = channel_layout(output, channel_dim);
  TORCH_CHECK(layout.has_value(), "bias_leaky_relu_: output must be contiguous or channels_last");
  const auto [outer, channels, inner] = *layout;
  const at::Tensor bias_acc = bias_in_accumulation_type(bias, output, channels);
  if (output.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, output.scalar_type(), "bias_leaky_relu_", [&] {
    using acc_t = acc_type<scalar_t>;
    using Vec = AccVec<scalar_t>;
    scalar_t* data = output.mutable_data_ptr<scalar_t>();
    const acc_t* bias_data = bias_acc.const_data_ptr<acc_t>();
    const acc_t slope = static_cast<acc_t>(negative_slope);
    const Vec slope_vec(slope);
    const Vec zero(acc_t(0));
    auto activate = [&](const Vec& pre) { return Vec::blendv(pre * slope_vec, pre, pre > zero); };
    if (inner == 1) {
      // Channels innermost (channels_last, Linear): each row adds the bias vector.
      const int64_t grain_rows = std::max<int64_t>(1, kElementwiseGrain / channels);
      at::parallel_for(0, outer, grain_rows, [&](int64_t row_begin, int64_t row_end) {
        for (int64_t row = row_begin; row < row_end; ++row) {
          scalar_t* row_data = data + row * channels;
          int64_t c = 0;
          for (; c + Vec::size() <= channels; c += Vec::size()) {
            store_acc(row_data + c, activate(load_acc(row_data + c) + Vec::loadu(bias_data + c)));
          }
          for (; c < channels; ++c) {
            row_data[c] = static_cast<scalar_t>(
                math::leaky_relu_forward<acc_t>(static_cast<acc_t>(row_data[c]) + bias_data[c], slope));
          }
        }
      });
    } else {
      // Channels outside the inner dims (NCHW): each plane of `inner` elements adds one value.
      const int64_t grain_planes = std::max<int64_t>(1, kElementwiseGrain / inner);
      at::parallel_for(0, outer * channels, grain_planes, [&](int64_t plane_begin, int64_t plane_end) {
        for (int64_t plane = plane_begin; plane < plane_end; ++plane) {
          scalar_t* plane_data = data + plane * inner;
          const acc_t bias_value = bias_data[plane % channels];
          const Vec bias_vec(bias_value);
          int64_t i = 0;
          for (; i + Vec::size() <= inner; i += Vec::size()) {
            store_acc(plane_data + i, activate(load_acc(plane_data + i) + bias_vec));
          }
          for (; i < inner; ++i) {
            plane_data[i] = static_cast<scalar_t>(
                math::leaky_relu_forward<acc_t>(static_cast<acc_t>(plane_data[i]) + bias_value, slope));
          }
        }
      });
    }
  });
}

// Elements per block of the bias-gradient reduction. The blocks are fixed by the
// shape alone, so the sums (and their bits) do not depend on the thread count.
constexpr int64_t kReductionBlock = 16384;

// Writes the mask of grad_dense into grad_input (which may be grad_dense itself: each
// element is read before it is written) and returns the bias gradient, its per-channel
// sum. output_dense has a channel_layout; grad_dense and grad_input have its strides.
at::Tensor mask_and_bias_gradient(const at::Tensor& grad_dense, const at::Tensor& output_dense,
                                  const at::Tensor& grad_input, double negative_slope, int64_t channel_dim) {
  const at::Tensor& output = output_dense;
  const auto [outer, channels, inner] = *channel_layout(output_dense, channel_dim);
  const auto acc_dtype = output.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (output.numel() == 0) {
    return at::zeros({channels}, output.options());
  }
  // inner == 1: blocks of whole rows, partial sums (blocks, channels).
  // inner > 1: blocks of at most kReductionBlock elements inside each (o, c) plane,
  //            partial sums (outer, channels, blocks_per_plane).
  const int64_t rows_per_block = std::max<int64_t>(1, kReductionBlock / channels);
  const int64_t blocks_per_plane = (inner + kReductionBlock - 1) / kReductionBlock;
  const int64_t blocks = inner == 1 ? (outer + rows_per_block - 1) / rows_per_block : outer * channels * blocks_per_plane;
  at::Tensor partials = at::empty({inner == 1 ? blocks * channels : blocks}, output.options().dtype(acc_dtype));
  at::Tensor grad_bias_acc = at::empty({channels}, output.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, output.scalar_type(), "bias_leaky_relu_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    using Vec = AccVec<scalar_t>;
    const scalar_t* grad_data = grad_dense.const_data_ptr<scalar_t>();
    const scalar_t* output_data = output_dense.const_data_ptr<scalar_t>();
    scalar_t* result = grad_input.mutable_data_ptr<scalar_t>();
    acc_t* partial_data = partials.mutable_data_ptr<acc_t>();
    acc_t* grad_bias_data = grad_bias_acc.mutable_data_ptr<acc_t>();
    const acc_t slope = static_cast<acc_t>(negative_slope);
    const Vec slope_vec(slope);
    const Vec zero(acc_t(0));
    // Writes the masked gradient of the Vec::size() elements at `index` and returns it
    // widened, so the caller can sum it: one pass over memory serves both outputs.
    auto masked = [&](int64_t index) {
      const Vec grad = load_acc(grad_data + index);
      const Vec value = Vec::blendv(grad * slope_vec, grad, load_acc(output_data + index) > zero);
      store_acc(result + index, value);
      return value;
    };
    auto masked_scalar = [&](int64_t index) {
      const acc_t value = math::leaky_relu_backward_from_output<acc_t>(
          static_cast<acc_t>(grad_data[index]), static_cast<acc_t>(output_data[index]), slope);
      result[index] = static_cast<scalar_t>(value);
      return value;
    };
    if (inner == 1) {
      at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
        for (int64_t block = block_begin; block < block_end; ++block) {
          acc_t* sums = partial_data + block * channels;
          std::fill(sums, sums + channels, acc_t(0));
          const int64_t row_end = std::min(outer, (block + 1) * rows_per_block);
          for (int64_t row = block * rows_per_block; row < row_end; ++row) {
            const int64_t row_start = row * channels;
            int64_t c = 0;
            for (; c + Vec::size() <= channels; c += Vec::size()) {
              (Vec::loadu(sums + c) + masked(row_start + c)).store(sums + c);
            }
            for (; c < channels; ++c) {
              sums[c] += masked_scalar(row_start + c);
            }
          }
        }
      });
      for (int64_t c = 0; c < channels; ++c) {
        acc_t total = 0;
        for (int64_t block = 0; block < blocks; ++block) total += partial_data[block * channels + c];
        grad_bias_data[c] = total;
      }
    } else {
      const int64_t grain_blocks = std::max<int64_t>(1, kElementwiseGrain / std::min(inner, kReductionBlock));
      at::parallel_for(0, blocks, grain_blocks, [&](int64_t block_begin, int64_t block_end) {
        for (int64_t block = block_begin; block < block_end; ++block) {
          const int64_t plane = block / blocks_per_plane;
          const int64_t start = plane * inner + (block % blocks_per_plane) * kReductionBlock;
          const int64_t end = std::min(plane * inner + inner, start + kReductionBlock);
          Vec vector_sum(acc_t(0));
          int64_t i = start;
          for (; i + Vec::size() <= end; i += Vec::size()) {
            vector_sum = vector_sum + masked(i);
          }
          acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vector_sum);
          for (; i < end; ++i) {
            sum += masked_scalar(i);
          }
          partial_data[block] = sum;
        }
      });
      for (int64_t c = 0; c < channels; ++c) {
        acc_t total = 0;
        for (int64_t o = 0; o < outer; ++o) {
          const acc_t* plane_sums = partial_data + (o * channels + c) * blocks_per_plane;
          for (int64_t k = 0; k < blocks_per_plane; ++k) total += plane_sums[k];
        }
        grad_bias_data[c] = total;
      }
    }
  });
  return grad_bias_acc.to(output.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> bias_leaky_relu_backward(const at::Tensor& grad_output,
                                                            const at::Tensor& output, double negative_slope,
                                                            int64_t channel_dim) {
  if (triton_chosen()) {
    return call_triton<decltype(bias_leaky_relu_backward)>("bias_leaky_relu_backward", grad_output, output, negative_slope, channel_dim);
  }
  const MaskSweepOperands operands = mask_sweep_operands("bias_leaky_relu_backward", grad_output, output, channel_dim);
  at::Tensor grad_bias = mask_and_bias_gradient(operands.grad_output, operands.output, operands.grad_input,
                                                negative_slope, operands.channel_dim);
  return {operands.grad_input, grad_bias};
}

// The same in place on grad_output (which must have output's dense strides); returns the
// bias gradient. The layers' backward uses it when it owns grad_output outright.
at::Tensor bias_leaky_relu_backward_(const at::Tensor& grad_output, const at::Tensor& output, double negative_slope,
                                     int64_t channel_dim) {
  if (triton_chosen()) {
    return call_triton<decltype(bias_leaky_relu_backward_)>("bias_leaky_relu_backward_", grad_output, output, negative_slope, channel_dim);
  }
  check_same_shape_and_dtype("bias_leaky_relu_backward_", grad_output, "grad_output", output, "output");
  channel_dim = c10::maybe_wrap_dim(channel_dim, output.dim());
  check_in_place_operand(grad_output, output, channel_dim);
  return mask_and_bias_gradient(grad_output, output, grad_output, negative_slope, channel_dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(imggen_fast, CPU, m) {
  m.impl("leaky_relu_backward_from_output", &leaky_relu_backward_from_output);
  m.impl("bias_leaky_relu_", &bias_leaky_relu_);
  m.impl("bias_leaky_relu_backward", &bias_leaky_relu_backward);
  m.impl("bias_leaky_relu_backward_", &bias_leaky_relu_backward_);
}

}  // namespace imggen_fast::cpu
