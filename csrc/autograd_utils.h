// Helpers for the C++ autograd of the imggen_fast ops. Autograd lives in C++ (the
// Autograd dispatch key) rather than in Python's torch.library.register_autograd
// because the Python path costs about 100 us per call on this class of machine,
// several times a small layer's whole forward; the C++ path costs what eager's own
// autograd nodes cost. The backward formulas call registered ops through the
// dispatcher, so they are themselves differentiable (double backward).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string>

namespace imggen_fast {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed handle of imggen_fast::<name>, looked up once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> imggen_fast_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((std::string("imggen_fast::") + name).c_str(), "")
      .template typed<Signature>();
}

}  // namespace imggen_fast
