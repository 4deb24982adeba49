// The public VAE bottleneck op, imggen_fast::reparameterize_kl: its one autograd formula
// (every device: the Autograd key sits above CPU and CUDA). Its kernels are the
// reparameterize_kl_forward and reparameterize_kl_backward ops (csrc/cpu, csrc/cuda,
// kernels/). It saves mu, logvar and the seed (or eps), nothing of the size of z more,
// and the backward kernel regenerates the noise from the seed. A double backward
// (create_graph=True) takes the eager formula of the gradients instead, which autograd
// differentiates; it reads the noise back from the forward kernel (z = eps where mu = 0
// and logvar = 0).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "autograd_utils.h"

namespace imggen_fast {
namespace {

using ForwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                             const std::optional<at::Tensor>&,
                                                             const std::optional<at::Tensor>&, double,
                                                             c10::string_view);
using BackwardSignature = std::tuple<at::Tensor, at::Tensor>(
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, c10::string_view);

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& mu, const at::Tensor& logvar,
                                                const std::optional<at::Tensor>& eps,
                                                const std::optional<at::Tensor>& seed, double beta,
                                                c10::string_view reduction) {
  static const auto op = imggen_fast_op<ForwardSignature>("reparameterize_kl_forward");
  return op.call(mu, logvar, eps, seed, beta, reduction);
}

// d kl / d (per-sample sum) for each reduction: the factor the kernels apply too.
double reduction_factor(c10::string_view reduction, int64_t samples, int64_t per_sample) {
  if (reduction == "batchmean") {
    return 1.0 / static_cast<double>(samples);
  }
  if (reduction == "mean") {
    return 1.0 / static_cast<double>(samples * per_sample);
  }
  return 1.0;
}

// (grad_mu, grad_logvar) in differentiable ATen ops, for a double backward:
// grad_mu = grad_z + beta * f * grad_kl * mu and
// grad_logvar = grad_z * eps * exp(logvar / 2) / 2 + beta * f * grad_kl * (exp(logvar) - 1) / 2,
// f the reduction factor, grad_kl broadcast over each sample for reduction "none".
std::tuple<at::Tensor, at::Tensor> eager_gradients(const at::Tensor& grad_z, const at::Tensor& grad_kl,
                                                   const at::Tensor& mu, const at::Tensor& logvar,
                                                   const at::Tensor& eps, double beta, c10::string_view reduction) {
  at::Tensor grad_mu = at::zeros_like(mu);
  at::Tensor grad_logvar = at::zeros_like(logvar);
  if (grad_z.defined()) {
    grad_mu = grad_mu + grad_z;
    grad_logvar = grad_logvar + grad_z * eps * at::exp(0.5 * logvar) * 0.5;
  }
  if (grad_kl.defined()) {
    const int64_t samples = mu.size(0);
    const double factor = beta * reduction_factor(reduction, samples, samples ? mu.numel() / samples : 0);
    std::vector<int64_t> per_sample_shape(mu.dim(), 1);
    per_sample_shape[0] = samples;
    const at::Tensor scale = (grad_kl.dim() == 1 ? grad_kl.reshape(per_sample_shape) : grad_kl) * factor;
    grad_mu = grad_mu + scale * mu;
    grad_logvar = grad_logvar + scale * (at::exp(logvar) - 1.0) * 0.5;
  }
  return {grad_mu, grad_logvar};
}

class ReparameterizeKLFunction : public torch::autograd::Function<ReparameterizeKLFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& mu, const at::Tensor& logvar,
                               const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed,
                               double beta, c10::string_view reduction) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [z, kl] = call_forward(mu, logvar, eps, seed, beta, reduction);
    save_backend_choice(ctx);
    ctx->save_for_backward({mu, logvar, eps.value_or(at::Tensor()), seed.value_or(at::Tensor())});
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["reduction"] = std::string(reduction);
    // z or kl may be unused: their gradient then stays undefined and the kernel skips it.
    ctx->set_materialize_grads(false);
    return {z, kl};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = imggen_fast_op<BackwardSignature>("reparameterize_kl_backward");
    const auto backend_choice = backend_choice_of(ctx);
    // Edge 2 is eps when given (the seed, when it is, never requires grad). The kernels do
    // not differentiate eps: an error, not a silent zero (imggen_fast.functional sends
    // such calls to the reference before they get here).
    TORCH_CHECK(!ctx->needs_input_grad(2), "imggen_fast::reparameterize_kl is not differentiable with respect to eps");
    const auto saved = ctx->get_saved_variables();
    const std::string reduction = ctx->saved_data["reduction"].toStringRef();
    const double beta = ctx->saved_data["beta"].toDouble();
    at::Tensor grad_mu;
    at::Tensor grad_logvar;
    if (at::GradMode::is_enabled()) {
      // A double backward: the noise as a tensor, then the eager formula.
      at::Tensor eps = saved[2];
      if (!eps.defined()) {
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        const at::Tensor zeros = at::zeros_like(saved[0]);
        eps = std::get<0>(call_forward(zeros, zeros, std::nullopt, saved[3], 0.0, reduction));
      }
      std::tie(grad_mu, grad_logvar) = eager_gradients(grads[0], grads[1], saved[0], saved[1], eps, beta, reduction);
    } else {
      // Below autograd: the saved tensors require grad, and the kernel op has no autograd
      // kernel of its own to pass through.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(grad_mu, grad_logvar) = op.call(defined_or_none(grads[0]), defined_or_none(grads[1]), saved[0],
                                               saved[1], defined_or_none(saved[2]), defined_or_none(saved[3]), beta,
                                               reduction);
    }
    return {ctx->needs_input_grad(0) ? grad_mu : at::Tensor(), ctx->needs_input_grad(1) ? grad_logvar : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> reparameterize_kl_autograd(const at::Tensor& mu, const at::Tensor& logvar,
                                                              const std::optional<at::Tensor>& eps,
                                                              const std::optional<at::Tensor>& seed, double beta,
                                                              c10::string_view reduction) {
  const auto outputs = ReparameterizeKLFunction::apply(mu, logvar, eps, seed, beta, reduction);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(imggen_fast, Autograd, m) {
  m.impl("reparameterize_kl", &reparameterize_kl_autograd);
}

// Without autograd (inference mode): the forward kernel alone.
TORCH_LIBRARY_IMPL(imggen_fast, CompositeExplicitAutograd, m) {
  m.impl("reparameterize_kl", &call_forward);
}

}  // namespace imggen_fast
