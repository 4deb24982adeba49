// The public BCE-with-logits ops, bce_with_logits and gan_d_loss: their one autograd
// formula and their autocast rule. Their kernels (csrc/cpu, csrc/cuda, kernels/) are the
// *_forward ops, whose one sweep computes the loss and, when autograd will need it, the
// gradient for grad_output = 1. The public ops return the loss alone, with or without
// autograd; the stored gradient stays inside the autograd node. A first backward takes
// it over and scales it in place (scale_stored), or, when it does not own it, scales a
// copy (imggen_fast::bce_with_logits_backward). A double backward (create_graph=True: a
// penalty on the loss's gradient) uses the eager formula of the gradient, which autograd
// differentiates.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "autograd_utils.h"
#include "bce_with_logits.h"

namespace imggen_fast {
namespace {

using BceSignature = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, double,
                                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t);
using BceForwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                               double, const std::optional<at::Tensor>&,
                                                               const std::optional<at::Tensor>&, int64_t, bool);
using GanSignature = at::Tensor(const at::Tensor&, const at::Tensor&, double, double, int64_t);
using GanForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                           double, double, int64_t, bool);
using BackwardSignature = std::vector<at::Tensor>(const at::Tensor&, at::TensorList, int64_t);

// True when `value` is a one-element CPU tensor equal to 1.
bool is_cpu_one(const at::Tensor& value) {
  if (!value.is_cpu() || value.numel() != 1) {
    return false;
  }
  bool one = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "is_cpu_one",
                                  [&] { one = static_cast<double>(*value.const_data_ptr<scalar_t>()) == 1.0; });
  return one;
}

// The tensors saved[index] for each index, moved out of `saved`.
std::vector<at::Tensor> moved(variable_list& saved, std::initializer_list<size_t> indices) {
  std::vector<at::Tensor> tensors;
  for (const size_t index : indices) {
    tensors.push_back(std::move(saved[index]));
  }
  return tensors;
}

// grad_loss * each stored unit gradient. Unit gradients this backward owns outright
// (keep_stored_gradients_for_backward; no retain_graph) become the results, scaled in
// place: no buffer of the input's size is allocated (its page faults cost more than the
// scaling), and the forward's buffer is the one memory reuses. The scaling is skipped
// when grad_loss is a CPU number equal to 1, what loss.backward() passes (reading one
// value from host memory is not a device sync; a CUDA grad_loss is never read). The
// callers move the saved tensors in, so no extra reference hides ownership.
std::vector<at::Tensor> scale_stored(const at::Tensor& grad_loss, std::vector<at::Tensor> unit_grads,
                                     int64_t reduction) {
  static const auto op = imggen_fast_op<BackwardSignature>("bce_with_logits_backward");
  bool in_place = true;
  for (const at::Tensor& unit_grad : unit_grads) {
    in_place = in_place && saved_owned_outright(unit_grad) && unit_grad.scalar_type() == grad_loss.scalar_type() &&
               (reduction != kReductionNone || unit_grad.sizes() == grad_loss.sizes());
  }
  if (!in_place) {
    // Only without grad mode (stored_gradient_serves): below autograd, since the kernel op
    // has no autograd kernel to pass through.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(grad_loss, unit_grads, reduction);
  }
  if (!is_cpu_one(grad_loss)) {
    for (const at::Tensor& unit_grad : unit_grads) {
      unit_grad.mul_(grad_loss);
    }
  }
  return unit_grads;
}

// grad_loss * d loss / d input in differentiable ATen ops: w * (l * sigmoid(x) - p * y),
// l = 1 + (p - 1) * y (p = 1 without pos_weight), divided by N for "mean".
at::Tensor eager_gradient(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                          const at::Tensor& weight, const at::Tensor& pos_weight, int64_t reduction) {
  const at::Tensor sigmoid = at::sigmoid(input);
  at::Tensor unit = pos_weight.defined() ? (1.0 + (pos_weight - 1.0) * target) * sigmoid - pos_weight * target
                                         : sigmoid - target;
  if (weight.defined()) {
    unit = unit * weight;
  }
  if (reduction == kReductionMean) {
    unit = unit / static_cast<double>(input.numel());
  }
  return grad_loss * unit;
}

// True when the stored unit gradient serves: it was computed, and no graph of the
// backward is being built.
bool stored_gradient_serves(AutogradContext* ctx) {
  return ctx->saved_data["compute_grad"].toBool() && !at::GradMode::is_enabled();
}

// The kernels do not differentiate target, weight or pos_weight (torch does not
// differentiate weight either); a gradient asked of them is an error, not a silent zero.
// imggen_fast.functional sends such calls to the reference before they get here.
void check_not_differentiated(AutogradContext* ctx) {
  static const char* const names[] = {"target", "weight", "pos_weight"};
  const auto given = ctx->saved_data["given"].toBoolList();
  size_t edge = 1;  // autograd's inputs: input, then each optional tensor that was given
  for (size_t k = 0; k < given.size(); ++k) {
    if (given[k]) {
      TORCH_CHECK(!ctx->needs_input_grad(edge), "imggen_fast::bce_with_logits is not differentiable with respect to ",
                  names[k]);
      ++edge;
    }
  }
}

class BceWithLogitsFunction : public torch::autograd::Function<BceWithLogitsFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& target,
                            double target_value, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& pos_weight, int64_t reduction, bool compute_grad) {
    static const auto op = imggen_fast_op<BceForwardSignature>("bce_with_logits_forward");
    at::Tensor loss;
    at::Tensor unit_grad;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(loss, unit_grad) = op.call(input, target, target_value, weight, pos_weight, reduction, compute_grad);
    }
    save_backend_choice(ctx);
    // The inputs are kept only for a double backward; they are references, not copies.
    ctx->save_for_backward({unit_grad, input, defined_or_undefined(target), defined_or_undefined(weight),
                            defined_or_undefined(pos_weight)});
    ctx->saved_data["target_value"] = target_value;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["compute_grad"] = compute_grad;
    ctx->saved_data["given"] = std::vector<bool>{target.has_value(), weight.has_value(), pos_weight.has_value()};
    ctx->set_materialize_grads(false);
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_not_differentiated(ctx);
    const auto backend_choice = backend_choice_of(ctx);
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    auto saved = ctx->get_saved_variables();
    at::Tensor grad_input;
    if (grads[0].defined()) {
      if (stored_gradient_serves(ctx)) {
        grad_input = scale_stored(grads[0], moved(saved, {0}), reduction)[0];
      } else {
        const at::Tensor target =
            saved[2].defined() ? saved[2] : at::full_like(saved[1], ctx->saved_data["target_value"].toDouble());
        grad_input = eager_gradient(grads[0], saved[1], target, saved[3], saved[4], reduction);
      }
    }
    return {grad_input, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class GanDiscriminatorLossFunction : public torch::autograd::Function<GanDiscriminatorLossFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& real_logits, const at::Tensor& fake_logits,
                            double real_label, double fake_label, int64_t reduction, bool compute_grad) {
    static const auto op = imggen_fast_op<GanForwardSignature>("gan_d_loss_forward");
    at::Tensor loss;
    at::Tensor grad_real;
    at::Tensor grad_fake;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(loss, grad_real, grad_fake) =
          op.call(real_logits, fake_logits, real_label, fake_label, reduction, compute_grad);
    }
    save_backend_choice(ctx);
    ctx->save_for_backward({grad_real, grad_fake, real_logits, fake_logits});
    ctx->saved_data["real_label"] = real_label;
    ctx->saved_data["fake_label"] = fake_label;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["compute_grad"] = compute_grad;
    ctx->set_materialize_grads(false);
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto backend_choice = backend_choice_of(ctx);
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    auto saved = ctx->get_saved_variables();
    at::Tensor grad_real;
    at::Tensor grad_fake;
    if (grads[0].defined()) {
      if (stored_gradient_serves(ctx)) {
        const auto scaled = scale_stored(grads[0], moved(saved, {0, 1}), reduction);
        grad_real = scaled[0];
        grad_fake = scaled[1];
      } else {
        const at::Tensor none;
        grad_real = eager_gradient(grads[0], saved[2], at::full_like(saved[2], ctx->saved_data["real_label"].toDouble()),
                                   none, none, reduction);
        grad_fake = eager_gradient(grads[0], saved[3], at::full_like(saved[3], ctx->saved_data["fake_label"].toDouble()),
                                   none, none, reduction);
      }
    }
    return {grad_real, grad_fake, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor bce_with_logits_autograd(const at::Tensor& input, const std::optional<at::Tensor>& target,
                                   double target_value, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  // The forward sweep stores the gradient only when a backward will use it.
  const bool compute_grad = at::GradMode::is_enabled() && input.requires_grad();
  return BceWithLogitsFunction::apply(input, target, target_value, weight, pos_weight, reduction, compute_grad);
}

at::Tensor gan_d_loss_autograd(const at::Tensor& real_logits, const at::Tensor& fake_logits, double real_label,
                               double fake_label, int64_t reduction) {
  const bool compute_grad = at::GradMode::is_enabled() && (real_logits.requires_grad() || fake_logits.requires_grad());
  return GanDiscriminatorLossFunction::apply(real_logits, fake_logits, real_label, fake_label, reduction,
                                             compute_grad);
}

// Without autograd (inference mode): the loss alone, no gradient stored.
at::Tensor bce_with_logits_loss(const at::Tensor& input, const std::optional<at::Tensor>& target,
                                double target_value, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  static const auto op = imggen_fast_op<BceForwardSignature>("bce_with_logits_forward");
  return std::get<0>(op.call(input, target, target_value, weight, pos_weight, reduction, false));
}

at::Tensor gan_d_loss_loss(const at::Tensor& real_logits, const at::Tensor& fake_logits, double real_label,
                           double fake_label, int64_t reduction) {
  static const auto op = imggen_fast_op<GanForwardSignature>("gan_d_loss_forward");
  return std::get<0>(op.call(real_logits, fake_logits, real_label, fake_label, reduction, false));
}

// Autocast: torch runs binary_cross_entropy_with_logits in float32 under autocast (CPU and
// CUDA), and so do these.
template <c10::DeviceType kDevice>
struct AutocastLosses : Autocast<kDevice> {
  using Base = Autocast<kDevice>;

  static at::Tensor bce_with_logits(const at::Tensor& input, const std::optional<at::Tensor>& target,
                                    double target_value, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
    static const auto op = imggen_fast_op<BceSignature>("bce_with_logits");
    const auto guard = Base::outside_autocast();
    return op.call(Base::to_float(input), Base::to_float(target), target_value, Base::to_float(weight),
                   Base::to_float(pos_weight), reduction);
  }

  static at::Tensor gan_d_loss(const at::Tensor& real_logits, const at::Tensor& fake_logits, double real_label,
                               double fake_label, int64_t reduction) {
    static const auto op = imggen_fast_op<GanSignature>("gan_d_loss");
    const auto guard = Base::outside_autocast();
    return op.call(Base::to_float(real_logits), Base::to_float(fake_logits), real_label, fake_label, reduction);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(imggen_fast, Autograd, m) {
  m.impl("bce_with_logits", &bce_with_logits_autograd);
  m.impl("gan_d_loss", &gan_d_loss_autograd);
}

TORCH_LIBRARY_IMPL(imggen_fast, CompositeExplicitAutograd, m) {
  m.impl("bce_with_logits", &bce_with_logits_loss);
  m.impl("gan_d_loss", &gan_d_loss_loss);
}

TORCH_LIBRARY_IMPL(imggen_fast, AutocastCPU, m) {
  m.impl("bce_with_logits", &AutocastLosses<c10::DeviceType::CPU>::bce_with_logits);
  m.impl("gan_d_loss", &AutocastLosses<c10::DeviceType::CPU>::gan_d_loss);
}

TORCH_LIBRARY_IMPL(imggen_fast, AutocastCUDA, m) {
  m.impl("bce_with_logits", &AutocastLosses<c10::DeviceType::CUDA>::bce_with_logits);
  m.impl("gan_d_loss", &AutocastLosses<c10::DeviceType::CUDA>::gan_d_loss);
}

}  // namespace imggen_fast
