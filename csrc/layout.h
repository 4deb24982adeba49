// Host-side helpers shared by the CPU and CUDA kernels: argument checks, and layout
// helpers that let a kernel sweep several operands as flat arrays with one index,
// without copying channels_last tensors to contiguous.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <optional>

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

// `tensor` if channel_layout() can describe it, else a contiguous copy (only for
// layouts that are neither contiguous nor channels_last, such as gapped views).
inline at::Tensor with_channel_layout(const at::Tensor& tensor, int64_t channel_dim) {
  return channel_layout(tensor, channel_dim) ? tensor : tensor.contiguous();
}

}  // namespace imggen_fast
