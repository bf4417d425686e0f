// The Python module ghostfast._C: importing it registers the kernels above with the dispatcher (the static
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL initialisers of the other translation units), and it exposes
// build_info() for `python -m ghostfast info` and bug reports.
#include <torch/extension.h>

#include <string>

#ifdef GHOSTFAST_WITH_CUDA
namespace ghostfast {
std::string cuda_build_version();  // cuda/build_info.cu
std::string cuda_build_archs();
}  // namespace ghostfast
#endif

namespace {

std::string compiler() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

py::dict build_info() {
  py::dict info;
  info["compiler"] = compiler();
#ifdef TORCH_VERSION_MAJOR
  info["torch"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                  std::to_string(TORCH_VERSION_PATCH);
#else
  info["torch"] = py::none();
#endif
#ifdef GHOSTFAST_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = ghostfast::cuda_build_version();
  info["cuda_archs"] = ghostfast::cuda_build_archs();
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::none();
#endif
#ifdef _OPENMP
  info["openmp"] = static_cast<int>(_OPENMP);
#else
  info["openmp"] = py::none();
#endif
#ifdef GHOSTFAST_CPU_AVX2
  info["cpu_isa"] = "avx2";
#else
  info["cpu_isa"] = "generic";
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ghostfast compiled kernels: CPU (C++) and CUDA backends of the ghostfast ops";
  m.def("build_info", &build_info, "How this extension was built: compiler, CUDA version and archs, OpenMP, CPU ISA");
}
