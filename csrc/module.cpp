// Python module entry point for fastland._C. The CPU kernels (csrc/<op>.cpp, helpers in
// csrc/cpu/) register themselves under the ops' own schemas, which fastland/ops/ defines
// (TORCH_LIBRARY_IMPL(fastland, CPU, m)); loading this module makes those registrations.
// One plain function besides: max_pool2d (csrc/max_pool.cpp), for fastland/attacks/_max_pool.py.
#include <torch/extension.h>

#include "cpu/max_pool.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastland C++ CPU kernels (registered as torch.ops.fastland.*)";
  m.attr("openmp") =
#ifdef _OPENMP
      true;
#else
      false;
#endif
  m.def("max_pool2d", &fastland::cpu::max_pool2d,
        "stride = kernel max-pool: (values, first-maximum indices) of z [n, C, H, W]");
}
