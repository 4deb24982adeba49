// The per-thread backend choice of csrc/backend.h, and the ops through which
// imggen_fast/backends.py sets and reads it.
#include "backend.h"

#include <torch/library.h>

namespace imggen_fast {
namespace {

thread_local bool triton_chosen_in_this_thread = false;

}  // namespace

bool triton_chosen() { return triton_chosen_in_this_thread; }

void set_triton_chosen(bool chosen) { triton_chosen_in_this_thread = chosen; }

c10::OperatorHandle triton_launcher(const std::string& name) {
  const auto handle = c10::Dispatcher::singleton().findOp(c10::OperatorName("imggen_fast::_triton_" + name, ""));
  TORCH_CHECK(handle.has_value(), "imggen_fast: the Triton backend was chosen but no Triton launcher of ", name,
              " is registered; choose it with imggen_fast.set_backend('triton'), which registers them");
  return *handle;
}

TORCH_LIBRARY_IMPL(imggen_fast, CatchAll, m) {
  m.impl("_set_triton_chosen", [](bool chosen) { set_triton_chosen(chosen); });
  m.impl("_triton_chosen", []() { return triton_chosen(); });
}

}  // namespace imggen_fast
