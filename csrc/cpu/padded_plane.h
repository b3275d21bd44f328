// Zero-padded planes for the one-input-channel convolution kernels (csrc/conv_*_1ch.cpp).
//
// A kernel keeps one plane per thread, zeroes it once and copies each image's data into the same
// interior window, so the border stays zero and every tap of a block reads whole rows without bounds.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastland {
namespace cpu {

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Copy `src` [rows, cols] (row-major) into `plane` (rows of `plane_cols` elements) at row `top`, column `left`.
template <typename T>
void copy_into_plane(const T* src, int64_t rows, int64_t cols, T* plane, int64_t plane_cols, int64_t top,
                     int64_t left) {
  for (int64_t r = 0; r < rows; ++r) std::copy(src + r * cols, src + (r + 1) * cols, plane + (top + r) * plane_cols + left);
}

// acc[r][l] += wv * src[r * stride + l] for a block of R rows of C elements: the step every tap of the
// one-channel forward and input-gradient kernels takes (inlined into each instruction set's clone).
template <typename T, int64_t R, int64_t C>
inline void accumulate_block(T (&acc)[R][C], T wv, const T* src, int64_t stride) {
  for (int64_t r = 0; r < R; ++r) {
#pragma omp simd
    for (int64_t l = 0; l < C; ++l) acc[r][l] += wv * src[r * stride + l];
  }
}

// The first `rows` x `cols` of a block into `out` (rows `stride` apart).
template <typename T, int64_t R, int64_t C>
inline void store_block(const T (&acc)[R][C], T* out, int64_t stride, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) std::copy(acc[r], acc[r] + cols, out + r * stride);
}

}  // namespace cpu
}  // namespace fastland
