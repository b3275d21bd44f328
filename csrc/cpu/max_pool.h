// The CPU kernel of fastland's stride = kernel max-pool (csrc/max_pool.cpp), called from
// Python through fastland._C (fastland/attacks/_max_pool.py).
#pragma once

#include <vector>

#include <ATen/ATen.h>

namespace fastland {
namespace cpu {

// z [n, C, H, W] (float32/float64, any strides) -> {values [n, C, H / kh, W / kw],
// indices (int64, same shape)}: each window's maximum and the flat plane index h * W + w of
// its first maximum in row-major window order (a NaN replaces), as PyTorch's max_pool2d.
std::vector<at::Tensor> max_pool2d(const at::Tensor& z, int64_t kh, int64_t kw);

}  // namespace cpu
}  // namespace fastland
