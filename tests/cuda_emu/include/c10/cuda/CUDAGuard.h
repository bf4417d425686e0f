// Stand-in for c10/cuda/CUDAGuard.h in the emulated translation units: there is one device.
#pragma once
#include <c10/core/Device.h>

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(Device) {}
  explicit CUDAGuard(DeviceIndex) {}
};
}  // namespace cuda
}  // namespace c10
