// Helpers shared by the CPU kernels in csrc/cpu/: loads and stores in the
// accumulation type, and the layout helpers of csrc/layout.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../layout.h"

#include <type_traits>

namespace imggen_fast::cpu {

// Elements per parallel_for chunk for elementwise sweeps: large enough that the
// cost of waking a thread is small against the work, small enough to split a
// 128x128 tensor across two cores.
constexpr int64_t kElementwiseGrain = 8192;

// Accumulation type: double for double, float for float/bfloat16/half.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
using AccVec = at::vec::Vectorized<acc_type<scalar_t>>;

// Loads AccVec<scalar_t>::size() elements starting at `data`, widened to acc_type.
template <typename scalar_t>
inline AccVec<scalar_t> load_acc(const scalar_t* data) {
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    return AccVec<scalar_t>::loadu(data);
  } else {
    at::vec::Vectorized<float> out;
    at::vec::load_to_float(data, out);
    return out;
  }
}

// Stores AccVec<scalar_t>::size() elements at `data`, narrowed to scalar_t.
template <typename scalar_t>
inline void store_acc(scalar_t* data, const AccVec<scalar_t>& values) {
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    values.store(data);
  } else {
    at::vec::convert_from_float<scalar_t>(values, values).store(data, AccVec<scalar_t>::size());
  }
}

using imggen_fast::check_same_shape_and_dtype;
using imggen_fast::dense;
using imggen_fast::in_layout_of;

}  // namespace imggen_fast::cpu
