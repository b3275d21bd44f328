// conv_input_grad_1ch: A^T g of a stride-1 2-D convolution with one input channel (csrc/conv_input_grad.cpp).
#pragma once

#include <ATen/ATen.h>

namespace fastland {
namespace cpu {

// g [B, O, Ho, Wo], w [O, 1, kh, kw] -> [B, 1, H, W]; Ho = H + 2 ph - kh + 1, Wo = W + 2 pw - kw + 1.
at::Tensor conv_input_grad_1ch(const at::Tensor& g, const at::Tensor& w, int64_t H, int64_t W, int64_t ph,
                               int64_t pw);

}  // namespace cpu
}  // namespace fastland
