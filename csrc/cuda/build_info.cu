// The CUDA side of ghostfast._C.build_info(): the toolkit version and the archs nvcc compiled for.
#include <cuda_runtime_api.h>

#include <string>

namespace ghostfast {

#define GHOSTFAST_STR2(x) #x
#define GHOSTFAST_STR(x) GHOSTFAST_STR2(x)

std::string cuda_build_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

std::string cuda_build_archs() {
#ifdef __CUDA_ARCH_LIST__
  return GHOSTFAST_STR(__CUDA_ARCH_LIST__);  // e.g. "900" or "800,900"
#else
  return "unknown";
#endif
}

}  // namespace ghostfast
