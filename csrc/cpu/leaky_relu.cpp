// CPU kernels of the LeakyReLU epilogue: one vectorized, parallel sweep over memory.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../leaky_relu.h"
#include "cpu_utils.h"

namespace imggen_fast::cpu {
namespace {

at::Tensor leaky_relu_backward_from_output(const at::Tensor& grad_output, const at::Tensor& output,
                                           double negative_slope) {
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

}  // namespace

TORCH_LIBRARY_IMPL(imggen_fast, CPU, m) {
  m.impl("leaky_relu_backward_from_output", &leaky_relu_backward_from_output);
}

}  // namespace imggen_fast::cpu
