// Host-side helpers shared by the CPU and CUDA kernels: argument checks, and layout
// helpers that let a kernel sweep several operands as flat arrays with one index,
// without copying channels_last tensors to contiguous.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/WrapDimMinimal.h>

#include <optional>
#include <algorithm>
#include <numeric>
#include <vector>

namespace imggen_fast {

// The Python layer validates arguments before any kernel runs; these checks keep a
// direct torch.ops call from reading out of bounds.
inline void check_same_shape_and_dtype(const char* op, const at::Tensor& first, const char* first_name,
                                       const at::Tensor& second, const char* second_name) {
  TORCH_CHECK(first.sizes() == second.sizes(), op, ": ", first_name, " shape ", first.sizes(),
              " does not match ", second_name, " shape ", second.sizes());
  TORCH_CHECK(first.scalar_type() == second.scalar_type(), op, ": ", first_name, " dtype ",
              first.scalar_type(), " does not match ", second_name, " dtype ", second.scalar_type());
  TORCH_CHECK(first.device() == second.device(), op, ": ", first_name, " device ", first.device(),
              " does not match ", second_name, " device ", second.device());
}

// True when the tensor covers its storage span without gaps or overlap, so a flat
// sweep over numel() elements from data_ptr() visits each element once
// (contiguous and channels_last tensors both qualify).
inline bool is_dense(const at::Tensor& tensor) {
  return tensor.is_non_overlapping_and_dense();
}

// `tensor` if it is dense (contiguous or channels_last), else a copy in the memory
// format it suggests. Only gapped or overlapping views are copied.
inline at::Tensor dense(const at::Tensor& tensor) {
  if (is_dense(tensor)) {
    return tensor;
  }
  return tensor.contiguous(tensor.suggest_memory_format());
}

// `tensor` with the same strides as `layout` (a dense tensor of the same shape):
// returned as is when the strides already match, else copied once into that layout.
inline at::Tensor in_layout_of(const at::Tensor& tensor, const at::Tensor& layout) {
  if (tensor.strides() == layout.strides() && is_dense(tensor)) {
    return tensor;
  }
  return at::empty_like(layout).copy_(tensor);
}

// A dense tensor seen as (outer, channels, inner) around its channel dim: element
// (o, c, i) sits at o * channels * inner + c * inner + i. Contiguous tensors give
// outer = prod(sizes before), inner = prod(sizes after); channels_last 4-D tensors
// with channel dim 1 give outer = N * H * W and inner = 1.
struct ChannelLayout {
  int64_t outer;
  int64_t channels;
  int64_t inner;
};

inline std::optional<ChannelLayout> channel_layout(const at::Tensor& tensor, int64_t channel_dim) {
  const int64_t channels = tensor.size(channel_dim);
  if (tensor.is_contiguous()) {
    int64_t outer = 1;
    int64_t inner = 1;
    for (int64_t d = 0; d < channel_dim; ++d) outer *= tensor.size(d);
    for (int64_t d = channel_dim + 1; d < tensor.dim(); ++d) inner *= tensor.size(d);
    return ChannelLayout{outer, channels, inner};
  }
  if (tensor.dim() == 4 && channel_dim == 1 && tensor.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return ChannelLayout{tensor.size(0) * tensor.size(2) * tensor.size(3), channels, 1};
  }
  return std::nullopt;
}

// `tensor` if channel_layout() can describe it, else a contiguous copy: only for layouts
// that are neither contiguous nor 4-D channels_last (gapped views, channels_last_3d),
// which the fused layers never produce: their outputs are one or the other.
inline at::Tensor with_channel_layout(const at::Tensor& tensor, int64_t channel_dim) {
  return channel_layout(tensor, channel_dim) ? tensor : tensor.contiguous();
}

// The operands of the out-of-place mask + bias-gradient backward, after its checks:
// output dense in a layout channel_layout() describes (channel_dim wrapped), grad_output
// in that layout, and a fresh grad_input like it.
struct MaskSweepOperands {
  at::Tensor output;
  at::Tensor grad_output;
  at::Tensor grad_input;
  int64_t channel_dim;
};

inline MaskSweepOperands mask_sweep_operands(const char* op, const at::Tensor& grad_output, const at::Tensor& output,
                                             int64_t channel_dim) {
  check_same_shape_and_dtype(op, grad_output, "grad_output", output, "output");
  channel_dim = c10::maybe_wrap_dim(channel_dim, output.dim());
  at::Tensor output_dense = with_channel_layout(dense(output), channel_dim);
  at::Tensor grad_dense = in_layout_of(grad_output, output_dense);
  at::Tensor grad_input = at::empty_like(output_dense);
  return {output_dense, grad_dense, grad_input, channel_dim};
}

// An in-place backward writes grad_output with output's element order: both must have
// the same strides, and a channel_layout.
inline void check_in_place_operand(const at::Tensor& grad_output, const at::Tensor& output, int64_t channel_dim) {
  TORCH_CHECK(grad_output.strides() == output.strides() && channel_layout(output, channel_dim).has_value(),
              "bias_leaky_relu_backward_: grad_output and output must have the same contiguous or channels_last "
              "strides");
}

// An operand broadcast against a dense tensor `layout`, seen from a flat sweep over
// layout's memory: sweep element i reads values[i % period]. The period is the product
// of the sizes of layout's innermost dims (in memory order) up to the outermost dim along
// which the operand varies: a tensor of layout's shape and strides has period numel, a
// per-class vector against (N, C) has period C, a (C, 1, 1) weight against a
// channels_last (N, C, H, W) tensor has period C, a one-element tensor has period 1.
// `values` is a 1-D tensor of those `period` elements: a view of the operand when its
// strides already list them in order, else a copy of just those elements (a per-sample
// (N, 1) weight against (N, C), say, whose period is the whole tensor).
struct PeriodicOperand {
  at::Tensor values;
  int64_t period;
};

inline PeriodicOperand periodic_operand(const at::Tensor& operand, const at::Tensor& layout) {
  const at::Tensor expanded = operand.expand(layout.sizes());
  // The dims of size > 1, innermost (smallest stride in layout) first.
  std::vector<int64_t> inner_first;
  for (int64_t dim = 0; dim < layout.dim(); ++dim) {
    if (layout.size(dim) > 1) {
      inner_first.push_back(dim);
    }
  }
  std::stable_sort(inner_first.begin(), inner_first.end(),
                   [&](int64_t a, int64_t b) { return layout.stride(a) < layout.stride(b); });
  size_t period_dims = 0;
  for (size_t k = 0; k < inner_first.size(); ++k) {
    if (expanded.stride(inner_first[k]) != 0) {
      period_dims = k + 1;
    }
  }
  int64_t period = 1;
  bool in_order = true;
  for (size_t k = 0; k < period_dims; ++k) {
    in_order = in_order && expanded.stride(inner_first[k]) == period;
    period *= layout.size(inner_first[k]);
  }
  if (in_order) {
    return {expanded.as_strided({period}, {1}), period};
  }
  // Copy the period's elements in layout's memory order: drop the size-1 dims, put the
  // rest outermost first, and keep index 0 of the dims outside the period (the operand
  // does not vary along them).
  at::Tensor view = expanded;
  std::vector<int64_t> renumbered(layout.dim(), -1);
  for (int64_t dim = layout.dim() - 1; dim >= 0; --dim) {
    if (layout.size(dim) == 1) {
      view = view.select(dim, 0);
    }
  }
  for (int64_t dim = 0, next = 0; dim < layout.dim(); ++dim) {
    if (layout.size(dim) > 1) {
      renumbered[dim] = next++;
    }
  }
  std::vector<int64_t> outer_first;
  for (auto dim = inner_first.rbegin(); dim != inner_first.rend(); ++dim) {
    outer_first.push_back(renumbered[*dim]);
  }
  view = view.permute(outer_first);
  for (size_t k = period_dims; k < inner_first.size(); ++k) {
    view = view.select(0, 0);
  }
  return {view.contiguous().reshape({period}), period};
}

}  // namespace imggen_fast
