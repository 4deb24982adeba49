// Helpers shared by the CUDA kernels in csrc/cuda/. Only c10/cuda headers are used:
// ATen/cuda/CUDAContext.h needs cusparse.h, which not every toolkit ships.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "../layout.h"

namespace imggen_fast::cuda {

constexpr int kThreadsPerBlock = 256;

// Blocks for a grid-stride loop over `numel` elements: enough to fill any current
// GPU, capped so the launch stays valid; the loop covers the rest.
inline unsigned int elementwise_blocks(int64_t numel) {
  const int64_t needed = (numel + kThreadsPerBlock - 1) / kThreadsPerBlock;
  return static_cast<unsigned int>(std::clamp<int64_t>(needed, 1, int64_t{1} << 16));
}

}  // namespace imggen_fast::cuda
