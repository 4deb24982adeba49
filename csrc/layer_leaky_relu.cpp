// The fused layers' forward: ConvTranspose2d / Conv2d / Linear (+ bias) + LeakyReLU.
//
// The layer itself is ATen's (oneDNN or MKL on CPU, cuDNN or cuBLAS on CUDA): it
// already runs at the machine's GEMM throughput, so the gain is the epilogue and
// the memory. The epilogue (bias + LeakyReLU) runs in place on the layer's output,
// through the dispatcher, so the CPU or CUDA kernel of imggen_fast::bias_leaky_relu_
// serves it; the pre-activation is never kept. On CPU, where oneDNN can apply
// LeakyReLU as a post-op of the convolution itself, that is used instead: no pass
// over the output after the GEMM at all.
//
// Registered for CompositeExplicitAutograd (every device); autograd is attached from
// Python (imggen_fast/ops/layer_leaky_relu.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

namespace imggen_fast {
namespace {

at::Tensor apply_bias_leaky_relu(const at::Tensor& output, const std::optional<at::Tensor>& bias,
                                 double negative_slope, int64_t channel_dim) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("imggen_fast::bias_leaky_relu_", "")
                             .typed<void(const at::Tensor&, const std::optional<at::Tensor>&, double, int64_t)>();
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

// The oneDNN op `name`, if this torch has it with the expected schema and the user has
// not turned the fusion off (IMGGEN_FAST_ONEDNN_FUSION=0).
std::optional<c10::OperatorHandle> onednn_op(const char* name, const char* expected_schema) {
  const char* setting = std::getenv("IMGGEN_FAST_ONEDNN_FUSION");
  if (setting != nullptr && std::string(setting) == "0") {
    return std::nullopt;
  }
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
  return input.device().is_cpu() && input.dim() == 4 && weight.dim() == 4 && input.scalar_type() == at::kFloat &&
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

c10::IValue optional_tensor(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() && tensor->defined() ? c10::IValue(*tensor) : c10::IValue();
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
  static const auto fused = onednn_op("mkldnn::_convolution_transpose_pointwise", kConvolutionTransposePointwiseSchema);
  if (fused.has_value() && onednn_fusion_applies(input, weight)) {
    return call_onednn(*fused,
                       {input, weight, optional_tensor(bias), padding.vec(), output_padding.vec(), stride.vec(),
                        dilation.vec(), groups},
                       negative_slope);
  }
  return convolution_with_epilogue(input, weight, bias, stride, padding, dilation, /*transposed=*/true,
                                   output_padding, groups, negative_slope);
}

at::Tensor conv2d_leaky_relu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             double negative_slope) {
  static const auto fused = onednn_op("mkldnn::_convolution_pointwise", kConvolutionPointwiseSchema);
  if (fused.has_value() && onednn_fusion_applies(input, weight)) {
    return call_onednn(
        *fused, {input, weight, optional_tensor(bias), padding.vec(), stride.vec(), dilation.vec(), groups},
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

}  // namespace

TORCH_LIBRARY_IMPL(imggen_fast, CompositeExplicitAutograd, m) {
  m.impl("conv_transpose2d_leaky_relu", &conv_transpose2d_leaky_relu);
  m.impl("conv2d_leaky_relu", &conv2d_leaky_relu);
  m.impl("linear_leaky_relu", &linear_leaky_relu);
}

}  // namespace imggen_fast
