// Shared by the CPU (.cpp) and CUDA (.cu) kernels: the element math in csrc/<op>.h is
// written once as inline functions callable from host and device code.
#pragma once

#if defined(__CUDACC__)
#define IMGGEN_FAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define IMGGEN_FAST_HOST_DEVICE inline
#endif
