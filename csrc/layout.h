// Host-side helpers shared by the CPU and CUDA kernels: argument checks, and layout
// helpers that let a kernel sweep several operands as flat arrays with one index,
// without copying channels_last tensors to contiguous.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

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

}  // namespace imggen_fast
