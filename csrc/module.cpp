// Python module entry point for fastland._C. The kernels live in csrc/cpu/ and
// register themselves with the dispatcher (TORCH_LIBRARY_IMPL(fastland, CPU, m));
// loading this module is what makes those registrations happen.
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
