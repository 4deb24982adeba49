// The schemas of every imggen_fast C++/CUDA op. Kernels register themselves for the
// CPU key in csrc/cpu/<op>.cpp and for the CUDA key in csrc/cuda/<op>.cu; fake
// (meta) implementations and autograd are attached from Python in imggen_fast/ops/.
#include <torch/library.h>

TORCH_LIBRARY(imggen_fast, m) {
  // grad_input = grad_output * (output > 0 ? 1 : negative_slope), output = leaky_relu(input).
  m.def("leaky_relu_backward_from_output(Tensor grad_output, Tensor output, float negative_slope) -> Tensor");
  // Binary cross-entropy with logits, F.binary_cross_entropy_with_logits' contract: target
  // of input's shape, or (target=None) the number target_value for every element; weight
  // and pos_weight broadcast to input's shape; reduction as at::Reduction (0 none, 1 mean,
  // 2 sum). With compute_grad, the same sweep writes grad_input = d loss / d input for
  // grad_output = 1 (else grad_input is empty); the backward scales it.
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
