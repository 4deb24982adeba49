// The schemas of every imggen_fast C++/CUDA op. Kernels register themselves for the
// CPU key in csrc/cpu/<op>.cpp and for the CUDA key in csrc/cuda/<op>.cu, autograd for
// the Autograd key in csrc/<op>_autograd.cpp (csrc/layer_leaky_relu.cpp for the
// layers); fake (meta) implementations are attached from Python in imggen_fast/ops/.
#include <torch/library.h>

TORCH_LIBRARY(imggen_fast, m) {
  // grad_input = grad_output * (output > 0 ? 1 : negative_slope), output = leaky_relu(input).
  m.def("leaky_relu_backward_from_output(Tensor grad_output, Tensor output, float negative_slope) -> Tensor");
  // output = leaky_relu(output + bias broadcast along channel_dim), in place (the fused layers' epilogue).
  m.def("bias_leaky_relu_(Tensor(a!) output, Tensor? bias, float negative_slope, int channel_dim) -> ()");
  // (grad_input, grad_bias): grad_input as leaky_relu_backward_from_output, grad_bias its sum over
  // every dim but channel_dim, in one sweep.
  m.def("bias_leaky_relu_backward(Tensor grad_output, Tensor output, float negative_slope, int channel_dim) "
        "-> (Tensor, Tensor)");
  // The same in place on grad_output (same strides as output), returning grad_bias: the
  // layers' backward uses it when nothing else holds grad_output.
  m.def("bias_leaky_relu_backward_(Tensor(a!) grad_output, Tensor output, float negative_slope, int channel_dim) "
        "-> Tensor");
  // The fused layers: leaky_relu(layer(input, weight) + bias, negative_slope), with torch's arguments.
  m.def("conv_transpose2d_leaky_relu(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] output_padding, int groups, int[2] dilation, float negative_slope) -> Tensor");
  m.def("conv2d_leaky_relu(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, float negative_slope) -> Tensor");
  m.def("linear_leaky_relu(Tensor input, Tensor weight, Tensor? bias, float negative_slope) -> Tensor");
  // z = mu + eps * exp(0.5 * logvar) and kl = beta * KL(N(mu, exp(logvar)) || N(0, 1)) per sample,
  // reduced by `reduction` ("batchmean", "sum", "mean" or "none"). Without eps, the noise is
  // Philox4x32-10 + Box-Muller keyed by the 1-element int64 `seed` (Triton's tl.randn4x).
  m.def("reparameterize_kl_forward(Tensor mu, Tensor logvar, Tensor? eps, Tensor? seed, float beta, "
        "str reduction) -> (Tensor z, Tensor kl)");
  // (grad_mu, grad_logvar) from grad_z and grad_kl (either may be None), the noise regenerated from seed.
  m.def("reparameterize_kl_backward(Tensor? grad_z, Tensor? grad_kl, Tensor mu, Tensor logvar, Tensor? eps, "
        "Tensor? seed, float beta, str reduction) -> (Tensor grad_mu, Tensor grad_logvar)");
  // Binary cross-entropy with logits, F.binary_cross_entropy_with_logits' contract: target
  // of input's shape, or (target=None) the number target_value for every element; weight
  // and pos_weight broadcast to input's shape; reduction as at::Reduction (0 none, 1 mean,
  // 2 sum). With compute_grad, the same sweep writes grad_input = d loss / d input for
  // grad_output = 1 (else grad_input is empty); the backward scales it. When autograd
  // records the call, the stored gradients stay with the backward and the caller gets
  // empty tensors (csrc/bce_with_logits_autograd.cpp).
  m.def("bce_with_logits(Tensor input, Tensor? target, float target_value, Tensor? weight, Tensor? pos_weight, "
        "int reduction, bool compute_grad) -> (Tensor loss, Tensor grad_input)");
  // GAN discriminator loss bce(real_logits, real_label) + bce(fake_logits, fake_label), each
  // term reduced over its own elements (reduction 0 needs one shape), with both gradients.
  m.def("gan_d_loss(Tensor real_logits, Tensor fake_logits, float real_label, float fake_label, int reduction, "
        "bool compute_grad) -> (Tensor loss, Tensor grad_real, Tensor grad_fake)");
  // The backward of both: grad_output * unit_grad for each stored gradient (grad_output has
  // one element for a reduced loss, the gradients' shape for reduction 0).
  m.def("bce_with_logits_backward(Tensor grad_output, Tensor[] unit_grads, int reduction) -> Tensor[]");
}
