// The public BatchNorm + LeakyReLU ops, imggen_fast::batch_norm_leaky_relu and its in-place
// form batch_norm_leaky_relu_ (the output written over the input): their one autograd
// formula (every device: the Autograd key sits above CPU and CUDA), and their kernels
// without autograd (inference mode). The kernels are the batch_norm_leaky_relu_forward,
// batch_norm_leaky_relu_forward_ and batch_norm_leaky_relu_backward ops (csrc/cpu,
// csrc/cuda, kernels/).
//
// What is saved for backward (InPlace-ABN, Rota Bulo et al. 2018): weight, bias, the
// per-channel mean and invstd, and ONE tensor of the input's size:
//  * the activated output y, when the backward can recover x_hat = (leaky_relu^-1(y) - bias)
//    / weight from it accurately (recoverable_from_output): negative_slope > 0, CPU
//    tensors, and every channel well conditioned. y is usually kept by the next layer
//    anyway (a convolution keeps its input), so the op then costs no memory of its own,
//    and the input (a convolution's output) is freed.
//  * the input x otherwise: negative_slope == 0 (ReLU loses the negative pre-activations),
//    CUDA tensors (reading the weights to decide would cost a host sync per call), a
//    channel whose weight is too small for its bias (below), or tensors torch.compile is
//    tracing (the weights have no values then). This is what eager's batch_norm saves.
//    The in-place form then keeps a copy of the input, taken before it is overwritten.
//
// The backward kernel reads x_hat back from that tensor, makes one reduction pass
// (sum(g_pre), sum(g_pre * x_hat) per channel) and one elementwise pass, writing grad_input
// over grad_output when autograd hands grad_output over and nothing else holds it. With
// GradMode on in backward (create_graph=True), or when the statistics' own outputs get
// gradients (a double backward reaches them), the backward takes the eager formula in
// differentiable ATen ops instead, so double backward (gradient penalties) works; it reads
// the mean and invstd as outputs of this op, whose gradients this backward adds.
//
// The arguments are checked by the kernel ops (and, before any kernel, by
// imggen_fast.functional); the code here also runs on torch.compile's symbolic shapes.
//
// Autocast: none registered, on purpose. Eager's batch_norm under autocast runs in its
// input's dtype (a bfloat16 / float16 input with float32 parameters and statistics), which
// is what autocast's fallthrough does for these ops.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "autograd_utils.h"
#include "batch_norm_leaky_relu.h"

namespace imggen_fast {
namespace {

using namespace batch_norm_leaky_relu;  // the kernel ops' names and signatures

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_forward(const at::Tensor& input, const OptionalTensor& running_mean,
                                                            const OptionalTensor& running_var,
                                                            const OptionalTensor& weight, const OptionalTensor& bias,
                                                            bool training, double momentum, double eps,
                                                            double negative_slope) {
  static const auto op = imggen_fast_op<ForwardSignature>(kForwardName);
  return op.call(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope);
}

std::tuple<at::Tensor, at::Tensor> call_forward_in_place(const at::Tensor& input, const OptionalTensor& running_mean,
                                                         const OptionalTensor& running_var,
                                                         const OptionalTensor& weight, const OptionalTensor& bias,
                                                         bool training, double momentum, double eps,
                                                         double negative_slope) {
  static const auto op = imggen_fast_op<ForwardInPlaceSignature>(kForwardInPlaceName);
  return op.call(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope);
}

bool defined(const OptionalTensor& tensor) { return tensor.has_value() && tensor->defined(); }

// The running statistics are updated below autograd's in-place bookkeeping: their version
// counters are bumped here, so a tensor saved before the update is seen as modified.
void bump_running_statistics(const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training) {
  if (!training) {
    return;
  }
  for (const auto* statistic : {&running_mean, &running_var}) {
    if (defined(*statistic) && !statistic->value().is_inference()) {
      torch::autograd::impl::bump_version(statistic->value());
    }
  }
}

// The largest |bias| / |weight| of a channel whose x_hat is recovered from the output.
// x_hat = (pre - bias) / weight, and pre = leaky_relu^-1(y) carries y's rounding, of
// relative size eps_y: the error of x_hat is eps_y * |pre| / |weight|
// <= eps_y * (|x_hat| + |bias| / |weight|). For x_hat of order 1 (it is normalized), the
// bound keeps that within 5 roundings of y, where x_hat computed from a saved x carries
// eps_x * |x| * invstd. grad_weight = sum(g_pre * x_hat) divides by the weight through
// x_hat, so it is the gradient this conditions; grad_input and grad_bias multiply the
// error by the weight again or do not see it.
constexpr double kMaxBiasOverWeight = 4.0;

// The smallest min(1, slope) * |weight| of a recoverable channel: y near 0 is rounded to
// the spacing of the dtype's subnormals, which the inversion divides by the slope and
// the weight; this keeps that error within one rounding (epsilon) of an x_hat of order 1.
// It matters for float16 only (6.1e-5); the other dtypes' floor is below 1e-37.
double smallest_recoverable_weight(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return std::numeric_limits<c10::Half>::denorm_min() / std::numeric_limits<c10::Half>::epsilon();
    case at::kBFloat16:
      return std::numeric_limits<c10::BFloat16>::denorm_min() / std::numeric_limits<c10::BFloat16>::epsilon();
    case at::kDouble:
      return std::numeric_limits<double>::denorm_min() / std::numeric_limits<double>::epsilon();
    default:
      return std::numeric_limits<float>::denorm_min() / std::numeric_limits<float>::epsilon();
  }
}

// True when `tensor`'s values can be read on the host now: a plain CPU tensor, not one
// torch.compile is tracing (fake or functional tensors have no values).
bool readable_on_host(const at::Tensor& tensor) {
  static const c10::DispatchKeySet traced({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                           c10::DispatchKey::PythonTLSSnapshot});
  return tensor.device().is_cpu() && tensor.has_storage() && !tensor.key_set().has_any(traced);
}

// Per-channel values of an optional tensor (any floating dtype and stride) as doubles.
std::vector<double> host_values(const OptionalTensor& tensor) {
  std::vector<double> values;
  if (!defined(tensor)) {
    return values;
  }
  values.resize(static_cast<size_t>(tensor->numel()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tensor->scalar_type(), "host_values", [&] {
    const scalar_t* data = tensor->const_data_ptr<scalar_t>();
    for (size_t c = 0; c < values.size(); ++c) values[c] = static_cast<double>(data[c * tensor->stride(0)]);
  });
  return values;
}

// Whether the backward can recover x_hat from the activated output (see the top of the file).
bool recoverable_from_output(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                             double negative_slope) {
  if (!(negative_slope > 0) || !readable_on_host(input)) {
    return false;
  }
  for (const auto* tensor : {&weight, &bias}) {
    if (defined(*tensor) && !readable_on_host(tensor->value())) {
      return false;
    }
  }
  const double floor = smallest_recoverable_weight(input.scalar_type()) / std::min(1.0, negative_slope);
  const std::vector<double> weights = host_values(weight);
  const std::vector<double> biases = host_values(bias);
  const int64_t channels = input.size(1);
  for (int64_t c = 0; c < channels; ++c) {
    const double scale = std::abs(weights.empty() ? 1.0 : weights[c]);
    const double shift = std::abs(biases.empty() ? 0.0 : biases[c]);
    if (!(std::isfinite(scale) && std::isfinite(shift) && scale >= floor && shift <= kMaxBiasOverWeight * scale)) {
      return false;
    }
  }
  return true;
}

// A per-channel tensor (C,) reshaped to broadcast along dim 1 of an input of `dims` dims.
at::Tensor along_channels(const at::Tensor& values, int64_t dims) {
  std::vector<int64_t> shape(static_cast<size_t>(dims), 1);
  shape[1] = -1;
  return values.reshape(shape);
}

// (grad_input, grad_weight, grad_bias) in differentiable ATen ops, for a double backward.
// `saved` is the output y (from_output) or the input x; mean and invstd are this op's own
// outputs, so their gradients reach the input through this op again (grad_mean,
// grad_invstd: d mean / dx = 1 / n, d invstd / dx = -invstd^2 * x_hat / n in training).
std::tuple<at::Tensor, at::Tensor, at::Tensor> eager_gradients(
    const at::Tensor& grad_output, const at::Tensor& grad_mean, const at::Tensor& grad_invstd, const at::Tensor& saved,
    bool from_output, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
    const at::Tensor& invstd, bool training, double negative_slope) {
  const int64_t dims = saved.dim();
  std::vector<int64_t> reduced;
  for (int64_t dim = 0; dim < dims; ++dim) {
    if (dim != 1) reduced.push_back(dim);
  }
  // Symbolic under torch.compile's dynamic shapes: the count is a SymInt there.
  const c10::SymInt channels = saved.sym_size(1);
  const at::Scalar count(channels == 0 ? c10::SymInt(0) : saved.sym_numel() / channels);
  const at::Tensor mean_c = along_channels(mean, dims);
  const at::Tensor invstd_c = along_channels(invstd, dims);
  const at::Tensor weight_c = weight.defined() ? along_channels(weight, dims) : at::ones_like(invstd_c);
  const at::Tensor bias_c = bias.defined() ? along_channels(bias, dims) : at::zeros_like(invstd_c);
  at::Tensor normalized;
  at::Tensor positive;
  if (from_output) {
    positive = saved > 0;
    normalized = (at::where(positive, saved, saved / negative_slope) - bias_c) / weight_c;
  } else {
    const at::Tensor scale = weight_c * invstd_c;
    positive = (saved * scale + (bias_c - mean_c * scale)) > 0;
    normalized = (saved - mean_c) * invstd_c;
  }
  const at::Tensor grad = grad_output.defined() ? grad_output : at::zeros_like(saved);
  const at::Tensor grad_pre = at::where(positive, grad, grad * negative_slope);
  const at::Tensor sum_g = grad_pre.sum(reduced);
  const at::Tensor sum_gx = (grad_pre * normalized).sum(reduced);
  at::Tensor grad_input;
  if (training) {
    grad_input = weight_c * invstd_c *
                 (grad_pre - along_channels(sum_g, dims) / count - normalized * along_channels(sum_gx, dims) / count);
    if (grad_mean.defined()) {
      grad_input = grad_input + along_channels(grad_mean, dims) / count;
    }
    if (grad_invstd.defined()) {
      grad_input = grad_input - along_channels(grad_invstd, dims) * invstd_c * invstd_c * normalized / count;
    }
  } else {
    grad_input = weight_c * invstd_c * grad_pre;
  }
  const auto parameter_dtype = weight.defined() ? weight.scalar_type() : sum_g.scalar_type();
  return {grad_input.to(saved.scalar_type()), sum_gx.to(parameter_dtype), sum_g.to(parameter_dtype)};
}

// True when the backward may write grad_input over grad_output: autograd handed it over
// and nothing else holds it (owned_outright), and it has the saved tensor's dtype and
// strides, of a layout the kernels read directly. The two references are the backward's
// own `grads` and the argument list autograd's node copies it from, which the node drops
// unread after the backward returns; a hook on the op's output, or a retained .grad,
// holds a third.
bool may_overwrite(const at::Tensor& grad_output, const at::Tensor& saved) {
  return grad_output.defined() && owned_outright(grad_output, 2) && grad_output.scalar_type() == saved.scalar_type() &&
         grad_output.sizes() == saved.sizes() && grad_output.strides() == saved.strides() &&
         layout_of(saved).has_value();
}

class BatchNormLeakyReLUFunction : public torch::autograd::Function<BatchNormLeakyReLUFunction> {
 public:
  // input_copy: for the in-place form when the output cannot give x_hat back, a copy of
  // the input taken (with autograd) before it is overwritten; saved instead of it.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const OptionalTensor& input_copy,
                               const OptionalTensor& running_mean, const OptionalTensor& running_var,
                               const OptionalTensor& weight, const OptionalTensor& bias, bool training,
                               double momentum, double eps, double negative_slope, bool in_place, bool from_output) {
    at::Tensor output, mean, invstd;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      if (in_place) {
        std::tie(mean, invstd) =
            call_forward_in_place(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                  negative_slope);
        output = input;
        ctx->mark_dirty({input});
      } else {
        std::tie(output, mean, invstd) =
            call_forward(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope);
      }
    }
    bump_running_statistics(running_mean, running_var, training);
    save_backend_choice(ctx);
    const at::Tensor saved = from_output ? output : (input_copy.has_value() ? *input_copy : input);
    ctx->save_for_backward({saved, defined_or_undefined(weight), defined_or_undefined(bias), mean, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["from_output"] = from_output;
    // Autograd numbers the edges of the given tensor arguments only: weight's and bias's
    // depend on which optional tensors came before them.
    int64_t edge = 1 + defined(input_copy) + defined(running_mean) + defined(running_var);
    ctx->saved_data["weight_edge"] = defined(weight) ? edge++ : int64_t{-1};
    ctx->saved_data["bias_edge"] = defined(bias) ? edge : int64_t{-1};
    if (!training) {
      // Normalized with the running statistics: constants, not functions of the input.
      ctx->mark_non_differentiable({mean, invstd});
    }
    ctx->set_materialize_grads(false);
    return {output, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = imggen_fast_op<BackwardSignature>(kBackwardName);
    static const auto in_place = imggen_fast_op<BackwardInPlaceSignature>(kBackwardInPlaceName);
    const auto backend_choice = backend_choice_of(ctx);
    const auto saved = ctx->get_saved_variables();
    const bool training = ctx->saved_data["training"].toBool();
    const double negative_slope = ctx->saved_data["negative_slope"].toDouble();
    const bool from_output = ctx->saved_data["from_output"].toBool();
    variable_list result(12);
    if (!grads[0].defined() && !grads[1].defined() && !grads[2].defined()) {
      return result;
    }
    at::Tensor grad_input, grad_weight, grad_bias;
    if (at::GradMode::is_enabled() || grads[1].defined() || grads[2].defined()) {
      std::tie(grad_input, grad_weight, grad_bias) =
          eager_gradients(grads[0], grads[1], grads[2], saved[0], from_output, saved[1], saved[2], saved[3], saved[4],
                          training, negative_slope);
    } else {
      // Below autograd: the kernel ops have no autograd kernel to pass through.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const OptionalTensor input = from_output ? std::nullopt : OptionalTensor(saved[0]);
      const OptionalTensor output = from_output ? OptionalTensor(saved[0]) : std::nullopt;
      if (may_overwrite(grads[0], saved[0])) {
        // grad_input over grad_output: no fresh buffer of the input's size to fault in.
        std::tie(grad_weight, grad_bias) = in_place.call(grads[0], input, output, saved[3], saved[4],
                                                         defined_or_none(saved[1]), defined_or_none(saved[2]),
                                                         training, negative_slope);
        grad_input = grads[0];
      } else {
        std::tie(grad_input, grad_weight, grad_bias) =
            op.call(grads[0], input, output, saved[3], saved[4], defined_or_none(saved[1]), defined_or_none(saved[2]),
                    training, negative_slope);
      }
    }
    const int64_t weight_edge = ctx->saved_data["weight_edge"].toInt();
    const int64_t bias_edge = ctx->saved_data["bias_edge"].toInt();
    result[0] = ctx->needs_input_grad(0) ? grad_input : at::Tensor();
    result[4] = weight_edge >= 0 && ctx->needs_input_grad(weight_edge) ? grad_weight : at::Tensor();
    result[5] = bias_edge >= 0 && ctx->needs_input_grad(bias_edge) ? grad_bias : at::Tensor();
    return result;
  }
};

bool needs_graph(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias) {
  return at::GradMode::is_enabled() && (input.requires_grad() || (defined(weight) && weight->requires_grad()) ||
                                        (defined(bias) && bias->requires_grad()));
}

at::Tensor batch_norm_leaky_relu_autograd(const at::Tensor& input, const OptionalTensor& running_mean,
                                          const OptionalTensor& running_var, const OptionalTensor& weight,
                                          const OptionalTensor& bias, bool training, double momentum, double eps,
                                          double negative_slope) {
  if (!needs_graph(input, weight, bias)) {
    at::Tensor output;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      output = std::get<0>(
          call_forward(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope));
    }
    bump_running_statistics(running_mean, running_var, training);
    return output;
  }
  const bool from_output = recoverable_from_output(input, weight, bias, negative_slope);
  return BatchNormLeakyReLUFunction::apply(input, std::nullopt, running_mean, running_var, weight, bias, training,
                                           momentum, eps, negative_slope, false, from_output)[0];
}

void batch_norm_leaky_relu_in_place_autograd(const at::Tensor& input, const OptionalTensor& running_mean,
                                             const OptionalTensor& running_var, const OptionalTensor& weight,
                                             const OptionalTensor& bias, bool training, double momentum, double eps,
                                             double negative_slope) {
  if (!needs_graph(input, weight, bias)) {
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      call_forward_in_place(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope);
    }
    if (!input.is_inference()) {
      torch::autograd::impl::bump_version(input);
    }
    bump_running_statistics(running_mean, running_var, training);
    return;
  }
  const bool from_output = recoverable_from_output(input, weight, bias, negative_slope);
  // When the output cannot give x_hat back, the backward needs the input: a copy, taken
  // with autograd so that a double backward reaches the input through it.
  const OptionalTensor input_copy = from_output ? std::nullopt : OptionalTensor(input.clone());
  if (input.is_view()) {
    // Autograd rewrites the graph of a view modified in place only for a function with one
    // output; this one has three (the statistics). Computed out of place and copied in,
    // with autograd: correct, without the memory saving.
    const at::Tensor output = BatchNormLeakyReLUFunction::apply(input, input_copy, running_mean, running_var, weight,
                                                                bias, training, momentum, eps, negative_slope, false,
                                                                from_output)[0];
    input.copy_(output);
    return;
  }
  BatchNormLeakyReLUFunction::apply(input, input_copy, running_mean, running_var, weight, bias, training, momentum,
                                    eps, negative_slope, true, from_output);
}

// Without autograd (inference mode): the forward kernels alone.
at::Tensor batch_norm_leaky_relu_inference(const at::Tensor& input, const OptionalTensor& running_mean,
                                           const OptionalTensor& running_var, const OptionalTensor& weight,
                                           const OptionalTensor& bias, bool training, double momentum, double eps,
                                           double negative_slope) {
  return std::get<0>(
      call_forward(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope));
}

void batch_norm_leaky_relu_in_place_inference(const at::Tensor& input, const OptionalTensor& running_mean,
                                              const OptionalTensor& running_var, const OptionalTensor& weight,
                                              const OptionalTensor& bias, bool training, double momentum, double eps,
                                              double negative_slope) {
  call_forward_in_place(input, running_mean, running_var, weight, bias, training, momentum, eps, negative_slope);
}

}  // namespace

TORCH_LIBRARY_IMPL(imggen_fast, Autograd, m) {
  m.impl("batch_norm_leaky_relu", &batch_norm_leaky_relu_autograd);
  m.impl("batch_norm_leaky_relu_", &batch_norm_leaky_relu_in_place_autograd);
}

TORCH_LIBRARY_IMPL(imggen_fast, CompositeExplicitAutograd, m) {
  m.impl("batch_norm_leaky_relu", &batch_norm_leaky_relu_inference);
  m.impl("batch_norm_leaky_relu_", &batch_norm_leaky_relu_in_place_inference);
}

}  // namespace imggen_fast
