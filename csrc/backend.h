// Which implementation of an op serves a call: the C++ kernel of the tensors' device (the
// CPU kernel in csrc/cpu, the CUDA kernel in csrc/cuda) or the op's Triton launcher.
//
// Every op has one schema, one autograd formula and one autocast rule, all in C++; the
// Triton launchers are further implementations of the same ops. imggen_fast/backends.py
// makes the choice (IMGGEN_FAST_BACKEND, imggen_fast.set_backend) and, when the Triton
// backend is chosen, says so here for the calling thread; each C++ kernel entry then hands
// the call to the launcher, which imggen_fast/ops/_registration.py registers as the
// internal op imggen_fast::_triton_<op> with the op's own schema. (Where this build has no
// CUDA kernels, _registration.py registers the launchers as the ops' CUDA kernels directly.)
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <type_traits>
#include <utility>

namespace imggen_fast {

// True when the calling thread chose the Triton backend (imggen_fast.set_backend("triton")).
bool triton_chosen();
void set_triton_chosen(bool chosen);

// Sets the calling thread's choice for its lifetime, then restores the one before. An op's
// backward runs with the choice its forward ran with, also on the worker thread that
// autograd uses for CUDA tensors.
class TritonChoiceGuard {
 public:
  explicit TritonChoiceGuard(bool chosen) : previous_(triton_chosen()) { set_triton_chosen(chosen); }
  ~TritonChoiceGuard() { set_triton_chosen(previous_); }
  TritonChoiceGuard(const TritonChoiceGuard&) = delete;
  TritonChoiceGuard& operator=(const TritonChoiceGuard&) = delete;

 private:
  bool previous_;
};

// The handle of imggen_fast::_triton_<name>, with a clear error when no launcher is
// registered (imggen_fast registers them when the Triton backend is first chosen).
c10::OperatorHandle triton_launcher(const std::string& name);

// Calls the Triton launcher of op `name` (its schema is the op's own) below autograd: the
// op's autograd already ran above the kernel entry that forwards here.
template <typename Signature, typename... Arguments>
decltype(auto) call_triton(const std::string& name, Arguments&&... arguments) {
  static_assert(std::is_function_v<Signature>);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return triton_launcher(name).typed<Signature>().call(std::forward<Arguments>(arguments)...);
}

}  // namespace imggen_fast
