// Python module entry point for fastland._C. The CPU kernels (csrc/<op>.cpp, helpers in
// csrc/cpu/) register themselves under the ops' own schemas, which fastland/ops/ defines
// (TORCH_LIBRARY_IMPL(fastland, CPU, m)); loading this module makes those registrations.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastland C++ CPU kernels (registered as torch.ops.fastland.*)";
  m.attr("openmp") =
#ifdef _OPENMP
      true;
#else
      false;
#endif
}
