// Python module entry point for fastland._C. The CPU kernels (csrc/<op>.cpp, helpers in
// csrc/cpu/) register themselves under the ops' own schemas, which fastland/ops/ defines
// (TORCH_LIBRARY_IMPL(fastland, CPU, m)); loading this module makes those registrations.
// Two plain functions besides: max_pool2d (csrc/max_pool.cpp), for fastland/attacks/_max_pool.py, and
// conv_input_grad_1ch (csrc/conv_input_grad.cpp), for fastland/_conv_grad.py.
#include <torch/extension.h>

#include "cpu/conv_input_grad.h"
#include "cpu/max_pool.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastland C++ CPU kernels (registered as torch.ops.fastland.*)";
  m.attr("openmp") =
#ifdef _OPENMP
      true;
#else
      false;
#endif
  m.def("conv_input_grad_1ch", &fastland::cpu::conv_input_grad_1ch,
        "A^T g of a stride-1 conv with one input channel: g [B, O, Ho, Wo], w [O, 1, kh, kw] -> [B, 1, H, W]");
  m.def("max_pool2d", &fastland::cpu::max_pool2d,
        "stride = kernel max-pool: (values, first-maximum indices) of z [n, C, H, W]");
}
