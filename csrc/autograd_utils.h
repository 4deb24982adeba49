// Helpers for the C++ autograd and autocast of the imggen_fast ops. Each op has one
// autograd formula, in C++ (the Autograd dispatch key), rather than in Python's
// torch.library.register_autograd: the Python path costs more per call than a small
// op's whole forward and backward (the README's Backends section gives the measured
// figures); the C++ path costs what eager's own autograd nodes cost. The price: the
// ops do not support torch.func transforms (a C++ autograd Function cannot). The
// backward formulas call registered ops through the dispatcher, so they are themselves
// differentiable (double backward).
#pragma once

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
// The one private header: whether the running backward keeps its graph (retain_graph),
// which decides whether a backward may overwrite a tensor it saved (saved_owned_outright).
#include <torch/csrc/autograd/graph_task.h>

#include "backend.h"

#include <optional>
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

// An optional tensor as a possibly undefined one (what save_for_backward stores), and back.
inline at::Tensor defined_or_undefined(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? *tensor : at::Tensor();
}

inline std::optional<at::Tensor> defined_or_none(const at::Tensor& tensor) {
  return tensor.defined() ? std::optional<at::Tensor>(tensor) : std::nullopt;
}

// True when a backward may overwrite `tensor` instead of allocating a result of its size
// (for a large tensor the fresh buffer's page faults cost as much as the sweep): no graph
// of the backward is being built, `tensor` is referenced from at most `references`
// places (the test torch's own AccumulateGrad uses to steal a gradient) and its storage
// from this tensor alone, and it is a plain tensor (not a fake, functional or subclass
// one being traced, nor a lazy zero, conjugate or negative view).
inline bool owned_outright(const at::Tensor& tensor, size_t references) {
  static const c10::DispatchKeySet traced({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                           c10::DispatchKey::PythonTLSSnapshot, c10::DispatchKey::ZeroTensor,
                                           c10::DispatchKey::Conjugate, c10::DispatchKey::Negative});
  return !c10::GradMode::is_enabled() && tensor.defined() && tensor.use_count() <= references &&
         tensor.has_storage() && tensor.storage().use_count() == 1 && !tensor.key_set().has_any(traced);
}

// The backend choice the forward ran with (csrc/backend.h), saved for its backward.
inline void save_backend_choice(AutogradContext* ctx) { ctx->saved_data["triton_chosen"] = triton_chosen(); }

// Restores, for the backward's lifetime, the backend choice its forward ran with.
inline TritonChoiceGuard backend_choice_of(AutogradContext* ctx) {
  return TritonChoiceGuard(ctx->saved_data["triton_chosen"].toBool());
}

// Autocast kernels of the public ops: the operands cast as eager casts those of the op
// the fused one replaces, then the op called again with autocast off for the device.
template <c10::DeviceType kDevice>
struct Autocast {
  // The operand in autocast's lower-precision dtype (fp64 and non-floating left alone).
  template <typename Operand>
  static Operand to_lower_precision(const Operand& operand) {
    return at::autocast::cached_cast(at::autocast::get_lower_precision_fp_from_device_type(kDevice), operand,
                                     kDevice);
  }

  // The operand in float32 (what autocast does for losses such as BCE-with-logits).
  template <typename Operand>
  static Operand to_float(const Operand& operand) {
    return at::autocast::cached_cast(at::kFloat, operand, kDevice);
  }

  static c10::impl::ExcludeDispatchKeyGuard outside_autocast() {
    return c10::impl::ExcludeDispatchKeyGuard(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  }
};

// True when a backward may overwrite a tensor it saved: as owned_outright, where the
// references are the saved variable and the unpacked copy in hand, and the graph is
// freed after this backward (no retain_graph=True), so nothing reads the tensor again.
inline bool saved_owned_outright(const at::Tensor& saved) {
  return !torch::autograd::get_current_graph_task_keep_graph() && owned_outright(saved, 2);
}

}  // namespace imggen_fast
