// Row-wise logsumexp / softmax over a block of contiguous rows, the building
// block of every fastland CPU kernel that touches logits.
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/ATen.h>

#include "vec_math.h"

namespace fastland {
namespace cpu {

// Rows handled together: the shifted logits of a block are exponentiated in one
// contiguous (vectorised) pass, which matters when rows are short (C = 10).
inline int64_t rows_per_block(int64_t C) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)); }

// For `rows` contiguous rows of length C starting at z:
//   lse[r] = logsumexp(z[r, :]) (max-shifted: finite for |z| ~ 1e4),
//   work[r, c] = softmax(z[r, :])_c when normalise, else exp(z[r, c] - max_r).
// work holds rows * C scalars, lse and sums hold rows scalars each (sums: scratch).
// exp and log run once over the whole block (vectorised), not row by row.
template <typename T>
void softmax_rows(const T* z, int64_t rows, int64_t C, T* work, T* lse, T* sums, bool normalise) {
  for (int64_t r = 0; r < rows; ++r) lse[r] = row_max(z + r * C, C);
  for (int64_t r = 0; r < rows; ++r) {
    const T* zr = z + r * C;
    const T m = lse[r];
    T* wr = work + r * C;
    for (int64_t c = 0; c < C; ++c) wr[c] = zr[c] - m;
  }
  exp_inplace(work, rows * C);
  for (int64_t r = 0; r < rows; ++r) sums[r] = row_sum(work + r * C, C);
  if (normalise) {
    for (int64_t r = 0; r < rows; ++r) {
      T* wr = work + r * C;
      const T inv = T(1) / sums[r];
      for (int64_t c = 0; c < C; ++c) wr[c] *= inv;
    }
  }
  log_inplace(sums, rows);
  for (int64_t r = 0; r < rows; ++r) lse[r] += sums[r];
}

// The checks every entry point makes: a contiguous CPU float/double tensor.
inline void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              ": expected float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (that of ",
              ref_name, "), got ", t.scalar_type());
}

}  // namespace cpu
}  // namespace fastland
