// The schemas of every imggen_fast C++/CUDA op. Kernels register themselves for the
// CPU key in csrc/cpu/<op>.cpp and for the CUDA key in csrc/cuda/<op>.cu; fake
// (meta) implementations and autograd are attached from Python in imggen_fast/ops/.
#include <torch/library.h>

TORCH_LIBRARY(imggen_fast, m) {
  // grad_input = grad_output * (output > 0 ? 1 : negative_slope), output = leaky_relu(input).
  m.def("leaky_relu_backward_from_output(Tensor grad_output, Tensor output, float negative_slope) -> Tensor");
}
