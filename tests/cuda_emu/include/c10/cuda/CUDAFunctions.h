// Stand-in for c10/cuda/CUDAFunctions.h in the emulated translation units: one device, index 0.
#pragma once
#include <c10/core/Device.h>

namespace c10 {
namespace cuda {
inline DeviceIndex current_device() { return 0; }
}  // namespace cuda
}  // namespace c10
