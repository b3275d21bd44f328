// Row kernels (dispatch on row length), block sizing and argument checks shared
// by the fastland CPU kernels.
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

// Rows at least this long take the per-instruction-set kernels of vec_math.cpp; shorter
// ones the inline loops below (baseline code) around one AVX-512/AVX2 exp and log pass
// over the whole block: for 10-element rows AVX-512 row loops were measured slower
// (masked remainders and per-row set-up).
constexpr int64_t kWideRows = 64;

// lse[r] = logsumexp(z[r, :]); work[r, c] = softmax (normalise) or exp(z - max_r).
template <typename T>
void softmax_rows(const T* z, int64_t rows, int64_t C, T* work, T* lse, T* sums, bool normalise) {
  if (C >= kWideRows) return softmax_rows_wide(z, rows, C, work, lse, sums, normalise);
  for (int64_t r = 0; r < rows; ++r) {
    const T* zr = z + r * C;
    const T m = row_max(zr, C);
    lse[r] = m;
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

// inv[r] = 1 / ||noise[r, :]||.
template <typename T>
inline void inv_norms(const T* noise, int64_t rows, int64_t C, T* inv) {
  for (int64_t r = 0; r < rows; ++r) inv[r] = row_dot(noise + r * C, noise + r * C, C);
  rsqrt_inplace(inv, rows);
}

// out[r, c] = noise[r, c] / ||noise[r, :]|| * (prob ? prob[r, c] : 1).
template <typename T>
void project_rows(const T* noise, const T* prob, int64_t rows, int64_t C, T* inv, T* out) {
  if (C >= kWideRows) return project_rows_wide(noise, prob, rows, C, inv, out);
  inv_norms(noise, rows, C, inv);
  for (int64_t r = 0; r < rows; ++r) {
    const T* nr = noise + r * C;
    T* o = out + r * C;
    const T s = inv[r];
    if (prob != nullptr) {
      const T* pr = prob + r * C;
      for (int64_t c = 0; c < C; ++c) o[c] = nr[c] * s * pr[c];
    } else {
      for (int64_t c = 0; c < C; ++c) o[c] = nr[c] * s;
    }
  }
}

// w[r, c] += g[r, c] * noise[r, c] / ||noise[r, :]||.
template <typename T>
void accumulate_projection(const T* g, const T* noise, int64_t rows, int64_t C, T* inv, T* w) {
  if (C >= kWideRows) return accumulate_projection_wide(g, noise, rows, C, inv, w);
  inv_norms(noise, rows, C, inv);
  for (int64_t r = 0; r < rows; ++r) {
    const T* nr = noise + r * C;
    const T* gr = g + r * C;
    T* wr = w + r * C;
    const T s = inv[r];
    for (int64_t c = 0; c < C; ++c) wr[c] += gr[c] * nr[c] * s;
  }
}

// out[r, c] = prob[r, c] * (w[r, c] + glse[r] - <w[r, :], prob[r, :]>).
template <typename T>
void softmax_backward_rows(const T* prob, const T* w, const T* glse, int64_t rows, int64_t C, T* out) {
  if (C >= kWideRows) return softmax_backward_rows_wide(prob, w, glse, rows, C, out);
  for (int64_t r = 0; r < rows; ++r) {
    const T* pr = prob + r * C;
    const T* wr = w + r * C;
    const T shift = glse[r] - row_dot(wr, pr, C);
    T* o = out + r * C;
    for (int64_t c = 0; c < C; ++c) o[c] = pr[c] * (wr[c] + shift);
  }
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
