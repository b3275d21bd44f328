// The forward and the weight gradient of a stride-1 2-D convolution with one input channel
// (csrc/conv_forward_1ch.cpp, csrc/conv_weight_grad_1ch.cpp); its input gradient is in conv_input_grad.h.
#pragma once

#include <tuple>

#include <ATen/ATen.h>

namespace fastland {
namespace cpu {

// x [B, 1, H, W], w [O, 1, kh, kw], b [O] or undefined -> [B, O, Ho, Wo]; Ho = H + 2 ph - kh + 1,
// Wo = W + 2 pw - kw + 1 (zero padding, stride 1, dilation 1).
at::Tensor conv_forward_1ch(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                            int64_t ph, int64_t pw);

// x [B, 1, H, W], g [B, O, Ho, Wo] -> (dw [O, 1, kh, kw], db [O] when `bias`, else an undefined tensor).
std::tuple<at::Tensor, at::Tensor> conv_weight_grad_1ch(const at::Tensor& x, const at::Tensor& g, int64_t kh,
                                                        int64_t kw, int64_t ph, int64_t pw, bool bias);

}  // namespace cpu
}  // namespace fastland
