// CUDA kernels of the LeakyReLU epilogue, on the current stream. The element math
// is csrc/leaky_relu.h, shared with the CPU kernel.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../leaky_relu.h"
#include "cuda_utils.h"

namespace imggen_fast::cuda {
namespace {

template <typename scalar_t>
__global__ void leaky_relu_backward_from_output_kernel(const scalar_t* __restrict__ grad_output,
                                                       const scalar_t* __restrict__ output,
                                                       scalar_t* __restrict__ grad_input,
                                                       int64_t numel,
                                                       at::opmath_type<scalar_t> negative_slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    grad_input[i] = static_cast<scalar_t>(math::leaky_relu_backward_from_output<acc_t>(
        static_cast<acc_t>(grad_output[i]), static_cast<acc_t>(output[i]), negative_slope));
  }
}

at::Tensor leaky_relu_backward_from_output(const at::Tensor& grad_output, const at::Tensor& output,
                                           double negative_slope) {
  check_same_shape_and_dtype("leaky_relu_backward_from_output", grad_output, "grad_output", output,
                             "output");
  const c10::cuda::CUDAGuard device_guard(output.device());
  const at::Tensor output_dense = dense(output);
  const at::Tensor grad_dense = in_layout_of(grad_output, output_dense);
  at::Tensor grad_input = at::empty_like(output_dense);
  const int64_t numel = output_dense.numel();
  if (numel == 0) {
    return grad_input;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, output.scalar_type(), "leaky_relu_backward_from_output", [&] {
        leaky_relu_backward_from_output_kernel<scalar_t>
            <<<elementwise_blocks(numel), kThreadsPerBlock, 0, stream>>>(
                grad_dense.const_data_ptr<scalar_t>(), output_dense.const_data_ptr<scalar_t>(),
                grad_input.mutable_data_ptr<scalar_t>(), numel,
                static_cast<at::opmath_type<scalar_t>>(negative_slope));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(imggen_fast, CUDA, m) {
  m.impl("leaky_relu_backward_from_output", &leaky_relu_backward_from_output);
}

}  // namespace imggen_fast::cuda
