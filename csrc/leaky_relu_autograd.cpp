// Autograd of the LeakyReLU epilogue's backward ops (their double backward): linear in
// grad_output with the same mask, zero in output (the mask is piecewise constant).
// The kernels are in csrc/cpu/leaky_relu.cpp and csrc/cuda/leaky_relu.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "autograd_utils.h"

namespace imggen_fast {
namespace {

using BackwardFromOutput = at::Tensor(const at::Tensor&, const at::Tensor&, double);
using BiasBackward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double, int64_t);

at::Tensor backward_from_output(const at::Tensor& grad_output, const at::Tensor& output, double negative_slope) {
  static const auto op = imggen_fast_op<BackwardFromOutput>("leaky_relu_backward_from_output");
  return op.call(grad_output, output, negative_slope);
}

class LeakyReLUBackwardFromOutput : public torch::autograd::Function<LeakyReLUBackwardFromOutput> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& output,
                            double negative_slope) {
    ctx->save_for_backward({output});
    ctx->saved_data["negative_slope"] = negative_slope;
    save_backend_choice(ctx);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return backward_from_output(grad_output, output, negative_slope);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto backend_choice = backend_choice_of(ctx);
    const at::Tensor output = ctx->get_saved_variables()[0];
    return {backward_from_output(grads[0], output, ctx->saved_data["negative_slope"].toDouble()), at::Tensor(),
            at::Tensor()};
  }
};

class BiasLeakyReLUBackward : public torch::autograd::Function<BiasLeakyReLUBackward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& output,
                               double negative_slope, int64_t channel_dim) {
    ctx->save_for_backward({output});
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["channel_dim"] = channel_dim;
    save_backend_choice(ctx);
    static const auto op = imggen_fast_op<BiasBackward>("bias_leaky_relu_backward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_input, grad_bias] = op.call(grad_output, output, negative_slope, channel_dim);
    return {grad_input, grad_bias};
  }

  // d/d grad_output of (grad_input, grad_bias) applied to (gg_input, gg_bias): the
  // mask applied to gg_input + gg_bias broadcast along the channel dim.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto backend_choice = backend_choice_of(ctx);
    const at::Tensor output = ctx->get_saved_variables()[0];
    const int64_t channel_dim = c10::maybe_wrap_dim(ctx->saved_data["channel_dim"].toInt(), output.dim());
    at::Tensor total = grads[0].defined() ? grads[0] : at::zeros_like(output);
    if (grads[1].defined()) {
      std::vector<int64_t> shape(output.dim(), 1);
      shape[channel_dim] = -1;
      total = total + grads[1].reshape(shape);
    }
    return {backward_from_output(total, output, ctx->saved_data["negative_slope"].toDouble()), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor leaky_relu_backward_from_output_autograd(const at::Tensor& grad_output, const at::Tensor& output,
                                                    double negative_slope) {
  return LeakyReLUBackwardFromOutput::apply(grad_output, output, negative_slope);
}

std::tuple<at::Tensor, at::Tensor> bias_leaky_relu_backward_autograd(const at::Tensor& grad_output,
                                                                     const at::Tensor& output, double negative_slope,
                                                                     int64_t channel_dim) {
  auto results = BiasLeakyReLUBackward::apply(grad_output, output, negative_slope, channel_dim);
  return {results[0], results[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(imggen_fast, Autograd, m) {
  m.impl("leaky_relu_backward_from_output", &leaky_relu_backward_from_output_autograd);
  m.impl("bias_leaky_relu_backward", &bias_leaky_relu_backward_autograd);
}

}  // namespace imggen_fast
