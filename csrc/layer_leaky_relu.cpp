// The fused layers' forward: ConvTranspose2d / Conv2d / Linear (+ bias) + LeakyReLU.
//
// The layer itself is ATen's (oneDNN or MKL on CPU, cuDNN or cuBLAS on CUDA): it
// already runs at the machine's GEMM throughput, so the gain is the epilogue and
// the memory. The epilogue (bias + LeakyReLU) runs in place on the layer's output,
// through the dispatcher, so the CPU or CUDA kernel of imggen_fast::bias_leaky_relu_
// serves it; the pre-activation is never kept. On CPU, where oneDNN can apply
// LeakyReLU as a post-op of the convolution itself, that is used instead (no pass
// over the output after the GEMM at all), except where it measured slower: transposed
// convolutions of stride 1.
//
// With the Triton backend chosen (csrc/backend.h), the convolutions run in Triton's
// implicit-GEMM kernel with the epilogue in its store (kernels/layer_leaky_relu.py), and
// every epilogue call goes to its Triton launcher.
//
// Forward registered for CompositeExplicitAutograd (every device). Autograd (the
// Autograd key, below) saves input, weight and the activated output, never the
// pre-activation; its backward turns grad_output into the pre-activation gradient and
// the bias gradient in one sweep (imggen_fast::bias_leaky_relu_backward), then takes
// the input and weight gradients from ATen. Every call in it goes through the
// dispatcher with autograd, so double backward (R1 / gradient penalties) works.
// Autocast kernels (AutocastCPU, AutocastCUDA) cast the operands as eager's layers do.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/WrapDimMinimal.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include "autograd_utils.h"
#include "backend.h"
#include "layout.h"

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

namespace imggen_fast {
namespace {

using ConvTransposeSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                          at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, at::IntArrayRef,
                                          double);
using ConvSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, double);
using LinearSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double);

at::Tensor apply_bias_leaky_relu(const at::Tensor& output, const std::optional<at::Tensor>& bias,
                                 double negative_slope, int64_t channel_dim) {
  static const auto op =
      imggen_fast_op<void(const at::Tensor&, const std::optional<at::Tensor>&, double, int64_t)>("bias_leaky_relu_");
  op.call(output, bias, negative_slope, channel_dim);
  return output;
}

// The schemas of torch's private oneDNN ops this file calls, as of torch 2.13. A torch
// whose schema differs falls back to at::convolution + our epilogue (and
// tests/test_layer_leaky_relu.py fails, so the change is noticed).
constexpr const char* kConvolutionPointwiseSchema =
    "mkldnn::_convolution_pointwise(Tensor X, Tensor W, Tensor? B, int[] padding, int[] stride, "
    "int[] dilation, int groups, str attr, Scalar?[] scalars, str? algorithm) -> Tensor Y";
constexpr const char* kConvolutionTransposePointwiseSchema =
    "mkldnn::_convolution_transpose_pointwise(Tensor X, Tensor W, Tensor? B, int[] padding, "
    "int[] output_padding, int[] stride, int[] dilation, int groups, str attr, Scalar?[] scalars, "
    "str? algorithm) -> Tensor Y";

// False when the user turned oneDNN's fusion off (IMGGEN_FAST_ONEDNN_FUSION=0); read on
// every call, so a change of the variable takes effect at once.
bool onednn_fusion_wanted() {
  const char* setting = std::getenv("IMGGEN_FAST_ONEDNN_FUSION");
  return setting == nullptr || std::string(setting) != "0";
}

// The oneDNN op `name`, if this torch has it with the expected schema.
std::optional<c10::OperatorHandle> onednn_op(const char* name, const char* expected_schema) {
  auto handle = c10::Dispatcher::singleton().findOp(c10::OperatorName(name, ""));
  if (!handle.has_value() || c10::toString(handle->schema()) != expected_schema) {
    return std::nullopt;
  }
  return handle;
}

// True where oneDNN's fused convolution applies: CPU, fp32, 4-D, oneDNN enabled. (Its
// bf16 path needs AVX-512 or AVX-NE-CONVERT, and raises without them; ATen's
// convolution picks a bf16 path that works on any CPU, so bf16 goes there.)
bool onednn_fusion_applies(const at::Tensor& input, const at::Tensor& weight) {
  return onednn_fusion_wanted() && input.device().is_cpu() && input.dim() == 4 && weight.dim() == 4 && input.scalar_type() == at::kFloat &&
         weight.scalar_type() == at::kFloat && at::globalContext().userEnabledMkldnn() && at::hasMKLDNN();
}

at::Tensor call_onednn(const c10::OperatorHandle& op, torch::jit::Stack stack, double negative_slope) {
  stack.emplace_back(std::string("leaky_relu"));
  c10::List<std::optional<at::Scalar>> scalars;
  scalars.push_back(at::Scalar(negative_slope));
  stack.emplace_back(scalars);
  stack.emplace_back(std::string(""));
  op.callBoxed(stack);
  return stack.at(0).toTensor();
}

// oneDNN reads the bias as a dense vector: a strided, expanded or offset view of one is
// copied (C elements) rather than read past its end.
c10::IValue dense_bias(const std::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? c10::IValue(bias->contiguous()) : c10::IValue();
}

// CPU: the bias goes into the GEMM (oneDNN adds it in its epilogue for free). CUDA:
// cuDNN would add it in a pass of its own, so our epilogue adds it with the activation.
at::Tensor convolution_with_epilogue(const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                                     at::IntArrayRef output_padding, int64_t groups, double negative_slope) {
  const bool bias_in_gemm = input.device().is_cpu();
  at::Tensor output = at::convolution(input, weight, bias_in_gemm ? bias : std::nullopt, stride, padding, dilation,
                                      transposed, output_padding, groups);
  return apply_bias_leaky_relu(output, bias_in_gemm ? std::nullopt : bias, negative_slope, 1);
}

at::Tensor conv_transpose2d_leaky_relu(const at::Tensor& input, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups,
                                       at::IntArrayRef dilation, double negative_slope) {
  if (triton_chosen()) {
    return call_triton<ConvTransposeSignature>("conv_transpose2d_leaky_relu", input, weight, bias, stride, padding,
                                               output_padding, groups, dilation, negative_slope);
  }
  static const auto fused = onednn_op("mkldnn::_convolution_transpose_pointwise", kConvolutionTransposePointwiseSchema);
  // At stride 1 oneDNN's fused transposed convolution is the slower one: measured on the
  // 2-core Zen 1 machine, fp32, batch 64, fused over ATen's conv_transpose2d + the
  // in-place epilogue (interleaved medians), 3x3 kernels: 512ch 4x4 1.12-1.31, 256ch 8x8
  // 1.59, 128ch 16x16 1.83; at stride 2 the two tie (0.98-1.03).
  const bool any_stride_above_one = std::any_of(stride.begin(), stride.end(), [](int64_t step) { return step > 1; });
  if (fused.has_value() && any_stride_above_one && onednn_fusion_applies(input, weight)) {
    return call_onednn(*fused,
                       {input, weight, dense_bias(bias), padding.vec(), output_padding.vec(), stride.vec(),
                        dilation.vec(), groups},
                       negative_slope);
  }
  return convolution_with_epilogue(input, weight, bias, stride, padding, dilation, /*transposed=*/true,
                                   output_padding, groups, negative_slope);
}

at::Tensor conv2d_leaky_relu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             double negative_slope) {
  if (triton_chosen()) {
    return call_triton<ConvSignature>("conv2d_leaky_relu", input, weight, bias, stride, padding, dilation, groups,
                                      negative_slope);
  }
  static const auto fused = onednn_op("mkldnn::_convolution_pointwise", kConvolutionPointwiseSchema);
  if (fused.has_value() && onednn_fusion_applies(input, weight)) {
    return call_onednn(
        *fused, {input, weight, dense_bias(bias), padding.vec(), stride.vec(), dilation.vec(), groups},
        negative_slope);
  }
  const std::vector<int64_t> no_output_padding(stride.size(), 0);
  return convolution_with_epilogue(input, weight, bias, stride, padding, dilation, /*transposed=*/false,
                                   no_output_padding, groups, negative_slope);
}

// input (*, in) @ weight(out, in)^T + bias as eager's F.linear computes it (addmm: the
// bias inside the GEMM, one rounding, so bf16 results match eager's bit for bit), then
// LeakyReLU in place along the last dim.
at::Tensor linear_leaky_relu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             double negative_slope) {
  const at::Tensor rows = input.reshape({-1, input.size(-1)});
  at::Tensor output = bias.has_value() && bias->defined() ? at::addmm(*bias, rows, weight.t()) : at::mm(rows, weight.t());
  std::vector<int64_t> output_shape = input.sizes().vec();
  output_shape.back() = weight.size(0);
  output = output.view(output_shape);
  return apply_bias_leaky_relu(output, std::nullopt, negative_slope, -1);
}


// True when the backward may overwrite grad_output with grad_pre: autograd handed it over
// and nothing else holds it (owned_outright), and it has output's dense strides.
bool may_overwrite(const at::Tensor& grad_output, const at::Tensor& output, int64_t channel_dim) {
  return owned_outright(grad_output, 1) && grad_output.scalar_type() == output.scalar_type() &&
         grad_output.sizes() == output.sizes() && grad_output.strides() == output.strides() &&
         channel_layout(output, channel_dim).has_value();
}

// (grad_pre, grad_bias) from grad_output and the saved activated output, through the
// dispatcher with autograd (so the backward is differentiable), in place on grad_output
// when may_overwrite() allows.
std::tuple<at::Tensor, at::Tensor> pre_activation_grads(const at::Tensor& grad_output, const at::Tensor& output,
                                                        double negative_slope, int64_t channel_dim,
                                                        bool bias_needed) {
  const int64_t dim = c10::maybe_wrap_dim(channel_dim, output.dim());
  if (may_overwrite(grad_output, output, dim)) {
    static const auto op =
        imggen_fast_op<at::Tensor(const at::Tensor&, const at::Tensor&, double, int64_t)>("bias_leaky_relu_backward_");
    // Grad mode is off here (owned_outright): below autograd, since the in-place kernel
    // op has no autograd kernel to pass through.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor grad_bias = op.call(grad_output, output, negative_slope, dim);
    return {grad_output, bias_needed ? grad_bias : at::Tensor()};
  }
  if (bias_needed) {
    static const auto op =
        imggen_fast_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double, int64_t)>(
            "bias_leaky_relu_backward");
    return op.call(grad_output, output, negative_slope, channel_dim);
  }
  static const auto op =
      imggen_fast_op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("leaky_relu_backward_from_output");
  return {op.call(grad_output, output, negative_slope), at::Tensor()};
}

// Saves what the gradients need, as eager's layers do, and never the pre-activation:
// always the activated output (the mask of every gradient); for a convolution, the
// input and weight (ATen's convolution backward reads both); for a linear layer, the
// weight only if the input needs a gradient and the input only if the weight does.
void save_for_backward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& output, double negative_slope,
                       bool both_operands) {
  ctx->save_for_backward({both_operands || weight.requires_grad() ? input : at::Tensor(),
                          both_operands || input.requires_grad() ? weight : at::Tensor(), output});
  ctx->saved_data["negative_slope"] = negative_slope;
  ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
  save_backend_choice(ctx);
}

// A gradient is computed when asked for and its ingredient was saved (the saved weight
// or input is absent exactly when the other operand did not require a gradient).
bool input_grad_needed(AutogradContext* ctx, const at::Tensor& saved_weight) {
  return ctx->needs_input_grad(0) && saved_weight.defined();
}

bool weight_grad_needed(AutogradContext* ctx, const at::Tensor& saved_input) {
  return ctx->needs_input_grad(1) && saved_input.defined();
}

// An absent (None) bias is not an autograd input at all, so its index exists only when given.
bool bias_needed(AutogradContext* ctx) {
  return ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
}

// The start of every layer's backward: the saved tensors, which gradients are due, and
// the pre-activation and bias gradients from one sweep over grad_output.
struct LayerGradients {
  at::Tensor input;
  at::Tensor weight;
  at::Tensor grad_pre;
  at::Tensor grad_bias;
  bool needs_input;
  bool needs_weight;
};

LayerGradients start_layer_backward(AutogradContext* ctx, const at::Tensor& grad_output, int64_t channel_dim) {
  const auto saved = ctx->get_saved_variables();
  auto [grad_pre, grad_bias] = pre_activation_grads(grad_output, saved[2], ctx->saved_data["negative_slope"].toDouble(),
                                                    channel_dim, bias_needed(ctx));
  return {saved[0], saved[1], grad_pre, grad_bias, input_grad_needed(ctx, saved[1]), weight_grad_needed(ctx, saved[0])};
}

class ConvolutionLeakyReLUFunction : public torch::autograd::Function<ConvolutionLeakyReLUFunction> {
 public:
  // Arguments in conv_transpose2d's order; conv2d passes output_padding = 0.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef output_padding, int64_t groups, at::IntArrayRef dilation,
                            double negative_slope, bool transposed) {
    at::Tensor output;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      if (transposed) {
        static const auto op = imggen_fast_op<ConvTransposeSignature>("conv_transpose2d_leaky_relu");
        output = op.call(input, weight, bias, stride, padding, output_padding, groups, dilation, negative_slope);
      } else {
        static const auto op = imggen_fast_op<ConvSignature>("conv2d_leaky_relu");
        output = op.call(input, weight, bias, stride, padding, dilation, groups, negative_slope);
      }
    }
    save_for_backward(ctx, input, weight, bias, output, negative_slope, /*both_operands=*/true);
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["output_padding"] = output_padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["transposed"] = transposed;
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    const auto backend_choice = backend_choice_of(ctx);
    const LayerGradients layer = start_layer_backward(ctx, grads[0], 1);
    at::Tensor grad_input;
    at::Tensor grad_weight;
    if (layer.needs_input || layer.needs_weight) {
      std::tie(grad_input, grad_weight, std::ignore) = at::convolution_backward(
          layer.grad_pre, layer.input, layer.weight, std::nullopt, ctx->saved_data["stride"].toIntVector(),
          ctx->saved_data["padding"].toIntVector(), ctx->saved_data["dilation"].toIntVector(),
          ctx->saved_data["transposed"].toBool(), ctx->saved_data["output_padding"].toIntVector(),
          ctx->saved_data["groups"].toInt(), {layer.needs_input, layer.needs_weight, false});
    }
    variable_list result(10);
    result[0] = grad_input;
    result[1] = grad_weight;
    result[2] = layer.grad_bias;
    return result;
  }
};

class LinearLeakyReLUFunction : public torch::autograd::Function<LinearLeakyReLUFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, double negative_slope) {
    at::Tensor output;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      static const auto op = imggen_fast_op<LinearSignature>("linear_leaky_relu");
      output = op.call(input, weight, bias, negative_slope);
    }
    save_for_backward(ctx, input, weight, bias, output, negative_slope, /*both_operands=*/false);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    const auto backend_choice = backend_choice_of(ctx);
    const LayerGradients layer = start_layer_backward(ctx, grads[0], -1);
    at::Tensor grad_input;
    at::Tensor grad_weight;
    if (layer.needs_input) {
      grad_input = at::matmul(layer.grad_pre, layer.weight);
    }
    if (layer.needs_weight) {
      grad_weight = layer.grad_pre.reshape({-1, layer.grad_pre.size(-1)})
                        .t()
                        .mm(layer.input.reshape({-1, layer.input.size(-1)}));
    }
    return {grad_input, grad_weight, layer.grad_bias, at::Tensor()};
  }
};

at::Tensor conv_transpose2d_leaky_relu_autograd(const at::Tensor& input, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef output_padding,
                                                int64_t groups, at::IntArrayRef dilation, double negative_slope) {
  return ConvolutionLeakyReLUFunction::apply(input, weight, bias, stride, padding, output_padding, groups, dilation,
                                             negative_slope, true);
}

at::Tensor conv2d_leaky_relu_autograd(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                      double negative_slope) {
  const std::vector<int64_t> no_output_padding(stride.size(), 0);
  return ConvolutionLeakyReLUFunction::apply(input, weight, bias, stride, padding, no_output_padding, groups,
                                             dilation, negative_slope, false);
}

at::Tensor linear_leaky_relu_autograd(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, double negative_slope) {
  return LinearLeakyReLUFunction::apply(input, weight, bias, negative_slope);
}

// Autocast: under torch.autocast the layers run in its lower-precision dtype, as torch's
// own convolutions and matmuls do (eager casts input, weight and bias before the layer).
// Without these kernels only the nested ATen call would be cast, and the epilogue and
// the backward would meet mixed dtypes. float64 operands are left alone (autocast's rule).
template <c10::DeviceType kDevice>
struct AutocastLayers : Autocast<kDevice> {
  using Base = Autocast<kDevice>;

  static at::Tensor conv_transpose2d(const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups,
                                     at::IntArrayRef dilation, double negative_slope) {
    static const auto op = imggen_fast_op<ConvTransposeSignature>("conv_transpose2d_leaky_relu");
    const auto guard = Base::outside_autocast();
    return op.call(Base::to_lower_precision(input), Base::to_lower_precision(weight), Base::to_lower_precision(bias), stride, padding, output_padding, groups, dilation,
                   negative_slope);
  }

  static at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           double negative_slope) {
    static const auto op = imggen_fast_op<ConvSignature>("conv2d_leaky_relu");
    const auto guard = Base::outside_autocast();
    return op.call(Base::to_lower_precision(input), Base::to_lower_precision(weight), Base::to_lower_precision(bias), stride, padding, dilation, groups, negative_slope);
  }

  static at::Tensor linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           double negative_slope) {
    static const auto op = imggen_fast_op<LinearSignature>("linear_leaky_relu");
    const auto guard = Base::outside_autocast();
    return op.call(Base::to_lower_precision(input), Base::to_lower_precision(weight), Base::to_lower_precision(bias), negative_slope);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(imggen_fast, AutocastCPU, m) {
  m.impl("conv_transpose2d_leaky_relu", &AutocastLayers<c10::DeviceType::CPU>::conv_transpose2d);
  m.impl("conv2d_leaky_relu", &AutocastLayers<c10::DeviceType::CPU>::conv2d);
  m.impl("linear_leaky_relu", &AutocastLayers<c10::DeviceType::CPU>::linear);
}

TORCH_LIBRARY_IMPL(imggen_fast, AutocastCUDA, m) {
  m.impl("conv_transpose2d_leaky_relu", &AutocastLayers<c10::DeviceType::CUDA>::conv_transpose2d);
  m.impl("conv2d_leaky_relu", &AutocastLayers<c10::DeviceType::CUDA>::conv2d);
  m.impl("linear_leaky_relu", &AutocastLayers<c10::DeviceType::CUDA>::linear);
}

TORCH_LIBRARY_IMPL(imggen_fast, CompositeExplicitAutograd, m) {
  m.impl("conv_transpose2d_leaky_relu", &conv_transpose2d_leaky_relu);
  m.impl("conv2d_leaky_relu", &conv2d_leaky_relu);
  m.impl("linear_leaky_relu", &linear_leaky_relu);
}

TORCH_LIBRARY_IMPL(imggen_fast, Autograd, m) {
  m.impl("conv_transpose2d_leaky_relu", &conv_transpose2d_leaky_relu_autograd);
  m.impl("conv2d_leaky_relu", &conv2d_leaky_relu_autograd);
  m.impl("linear_leaky_relu", &linear_leaky_relu_autograd);
}

}  // namespace imggen_fast
