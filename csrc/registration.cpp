// The schemas of every imggen_fast C++/CUDA op. Kernels register themselves for the
// CPU key in csrc/cpu/<op>.cpp and for the CUDA key in csrc/cuda/<op>.cu; fake
// (meta) implementations and autograd are attached from Python in imggen_fast/ops/.
#include <torch/library.h>

TORCH_LIBRARY(imggen_fast, m) {
  // grad_input = grad_output * (output > 0 ? 1 : negative_slope), output = leaky_relu(input).
  m.def("leaky_relu_backward_from_output(Tensor grad_output, Tensor output, float negative_slope) -> Tensor");
  // z = mu + eps * exp(0.5 * logvar) and kl = beta * KL(N(mu, exp(logvar)) || N(0, 1)) per sample,
  // reduced by `reduction` ("batchmean", "sum", "mean" or "none"). Without eps, the noise is
  // Philox4x32-10 + Box-Muller keyed by the 1-element int64 `seed` (Triton's tl.randn4x).
  m.def("reparameterize_kl_forward(Tensor mu, Tensor logvar, Tensor? eps, Tensor? seed, float beta, "
        "str reduction) -> (Tensor z, Tensor kl)");
  // (grad_mu, grad_logvar) from grad_z and grad_kl (either may be None), the noise regenerated from seed.
  m.def("reparameterize_kl_backward(Tensor? grad_z, Tensor? grad_kl, Tensor mu, Tensor logvar, Tensor? eps, "
        "Tensor? seed, float beta, str reduction) -> (Tensor grad_mu, Tensor grad_logvar)");
}
