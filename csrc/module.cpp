// Python module entry point for fastland._C. The CPU kernels (csrc/<op>.cpp, helpers in
// csrc/cpu/) register themselves under the ops' own schemas, which fastland/ops/ defines
// (TORCH_LIBRARY_IMPL(fastland, CPU, m)); loading this module makes those registrations.
// Plain functions besides: max_pool2d (csrc/max_pool.cpp), for fastland/attacks/_max_pool.py, and the
// one-input-channel convolution kernels conv_forward_1ch, conv_input_grad_1ch and conv_weight_grad_1ch
// (csrc/conv_*.cpp), for fastland/_conv_grad.py.
#include <torch/extension.h>

#include "cpu/conv_input_grad.h"
#include "cpu/conv_one_channel.h"
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
  m.def("conv_forward_1ch", &fastland::cpu::conv_forward_1ch,
        "a stride-1 conv with one input channel: x [B, 1, H, W], w [O, 1, kh, kw], b [O] or None -> [B, O, Ho, Wo]",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("b"), pybind11::arg("ph"), pybind11::arg("pw"));
  m.def("conv_weight_grad_1ch", &fastland::cpu::conv_weight_grad_1ch,
        "its weight and bias gradients: x [B, 1, H, W], g [B, O, Ho, Wo] -> (dw [O, 1, kh, kw], db [O] or None)");
  m.def("max_pool2d", &fastland::cpu::max_pool2d,
        "stride = kernel max-pool: (values, first-maximum indices) of z [n, C, H, W]");
}
