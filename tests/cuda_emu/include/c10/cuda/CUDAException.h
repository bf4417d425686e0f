// Stand-in for c10/cuda/CUDAException.h in the emulated translation units: a failed runtime call or launch throws.
#pragma once
#include "../../../cuda_emu_runtime.h"

#define C10_CUDA_CHECK(expr)                                                                              \
  do {                                                                                                    \
    const cudaError_t ghostfast_emu_err = (expr);                                                         \
    if (ghostfast_emu_err != cudaSuccess)                                                                 \
      throw ::ghostfast_emu::EmuError(std::string("cuda_emu: ") + #expr + " failed at " + __FILE__ + ":" + \
                                      std::to_string(__LINE__));                                          \
  } while (0)
// run_launch throws on a failed launch, so there is nothing left to check afterwards
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
