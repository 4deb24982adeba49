// Autograd of the fused VAE reparameterization + KL, for every device (the Autograd key
// sits above CPU and CUDA), in C++ for the reason given in csrc/autograd_utils.h: the op
// is overhead-bound at VAE latent sizes (on the development machine a forward call
// through register_autograd's Python autograd.Function took 113 us on a 2 x 4 input,
// through this one 21 us, and the backward runs no Python at all).
// It saves mu, logvar and the seed (or eps), and calls the backward op, which
// regenerates the noise from the seed. The backward op has no autograd of its own: a
// double backward is not supported. The kernels are in csrc/cpu and csrc/cuda.
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

class ReparameterizeKLFunction : public torch::autograd::Function<ReparameterizeKLFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& mu, const at::Tensor& logvar,
                               const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed,
                               double beta, c10::string_view reduction) {
    static const auto op = imggen_fast_op<ForwardSignature>("reparameterize_kl_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [z, kl] = op.call(mu, logvar, eps, seed, beta, reduction);
    ctx->save_for_backward({mu, logvar, eps.value_or(at::Tensor()), seed.value_or(at::Tensor())});
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["reduction"] = std::string(reduction);
    // z or kl may be unused: their gradient then stays undefined and the kernel skips it.
    ctx->set_materialize_grads(false);
    return {z, kl};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = imggen_fast_op<BackwardSignature>("reparameterize_kl_backward");
    // Edge 2 is eps when given (the seed, when it is, never requires grad). The kernels do
    // not differentiate eps: an error, not a silent zero (imggen_fast.functional sends
    // such calls to the reference before they get here).
    TORCH_CHECK(!ctx->needs_input_grad(2),
                "imggen_fast::reparameterize_kl_forward is not differentiable with respect to eps");
    const auto saved = ctx->get_saved_variables();
    const std::string reduction = ctx->saved_data["reduction"].toStringRef();
    auto [grad_mu, grad_logvar] =
        op.call(defined_or_none(grads[0]), defined_or_none(grads[1]), saved[0], saved[1],
                defined_or_none(saved[2]), defined_or_none(saved[3]), ctx->saved_data["beta"].toDouble(), reduction);
    return {ctx->needs_input_grad(0) ? grad_mu : at::Tensor(), ctx->needs_input_grad(1) ? grad_logvar : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> reparameterize_kl_forward_autograd(const at::Tensor& mu, const at::Tensor& logvar,
                                                                      const std::optional<at::Tensor>& eps,
                                                                      const std::optional<at::Tensor>& seed,
                                                                      double beta, c10::string_view reduction) {
  const auto outputs = ReparameterizeKLFunction::apply(mu, logvar, eps, seed, beta, reduction);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(imggen_fast, Autograd, m) {
  m.impl("reparameterize_kl_forward", &reparameterize_kl_forward_autograd);
}

}  // namespace imggen_fast
