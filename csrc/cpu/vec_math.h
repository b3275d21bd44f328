// Vectorisable row primitives shared by the fastland CPU kernels.
//
// Each function works on one contiguous run of elements, so that the compiler
// vectorises its loop; the definitions in vec_math.cpp are compiled for several
// instruction sets (target_clones: AVX-512, AVX2, baseline) and the best one is
// chosen when the library loads. float uses a polynomial exp accurate to ~2 ulp
// (glibc's expf does not vectorise without -ffast-math); double uses std::exp.
#pragma once

#include <cstdint>

namespace fastland {
namespace cpu {

// Block primitives, compiled per instruction set (call them on whole blocks, not short rows).
// x[i] <- exp(x[i]) for i < n. float: |rel. error| < 3e-7, exp(x) = 0 for x < -87.
void exp_inplace(float* x, int64_t n);
void exp_inplace(double* x, int64_t n);
// x[i] <- log(x[i]) for i < n, x[i] > 0 finite. float: |abs. error| < 3e-7 * max(1, |log x|).
void log_inplace(float* x, int64_t n);
void log_inplace(double* x, int64_t n);
// x[i] <- 1 / sqrt(x[i]) for i < n.
void rsqrt_inplace(float* x, int64_t n);
void rsqrt_inplace(double* x, int64_t n);

// Row kernels over a block of `rows` contiguous rows of length C, for long rows
// (C >= kWideRows), compiled per instruction set like the primitives above. The op
// files call the dispatchers of softmax_rows.h, which take inline code for short rows.
//
// softmax_rows_wide: lse[r] = logsumexp(z[r, :]) (max-shifted: finite for |z| ~ 1e4);
//   work[r, c] = softmax(z[r, :])_c when normalise, else exp(z[r, c] - max_r);
//   sums: rows scalars of scratch.
// project_rows_wide: out[r, c] = noise[r, c] / ||noise[r, :]|| * (prob ? prob[r, c] : 1);
//   inv: rows scalars of scratch.
// accumulate_projection_wide: w[r, c] += g[r, c] * noise[r, c] / ||noise[r, :]||; inv: scratch.
// softmax_backward_rows_wide: out[r, c] = prob[r, c] * (w[r, c] + glse[r] - <w[r, :], prob[r, :]>).
#define FASTLAND_DECLARE_ROW_KERNELS(T)                                                                         \
  void softmax_rows_wide(const T* z, int64_t rows, int64_t C, T* work, T* lse, T* sums, bool normalise);       \
  void project_rows_wide(const T* noise, const T* prob, int64_t rows, int64_t C, T* inv, T* out);             \
  void accumulate_projection_wide(const T* g, const T* noise, int64_t rows, int64_t C, T* inv, T* w);         \
  void softmax_backward_rows_wide(const T* prob, const T* w, const T* glse, int64_t rows, int64_t C, T* out);
FASTLAND_DECLARE_ROW_KERNELS(float)
FASTLAND_DECLARE_ROW_KERNELS(double)
#undef FASTLAND_DECLARE_ROW_KERNELS

// logsumexp of short rows (C <= kShortRows), float, 16 rows at a time in the lanes of
// AVX-512 registers: lse[r] for r < the returned count (a multiple of 16, 0 when the
// CPU lacks AVX-512 or C is too long); the caller finishes the remaining rows.
constexpr int64_t kShortRows = 16;
int64_t lse_short_rows(const float* z, int64_t rows, int64_t C, float* lse);
inline int64_t lse_short_rows(const double*, int64_t, int64_t, double*) { return 0; }

// Row reductions, inline: 16 independent lanes (vectorised for long rows, and more
// accurate than one running sum); a plain loop for rows shorter than 16.
constexpr int64_t kLanes = 16;

template <typename T>
inline T row_max(const T* x, int64_t n) {
  T m = x[0];
  const int64_t n16 = n - n % kLanes;
  if (n16 > 0) {
    T lane[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) lane[j] = x[j];
    for (int64_t i = kLanes; i < n16; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) lane[j] = x[i + j] > lane[j] ? x[i + j] : lane[j];
    m = lane[0];
    for (int64_t j = 1; j < kLanes; ++j) m = lane[j] > m ? lane[j] : m;
  }
  for (int64_t i = n16; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// sum_i x[i] * y[i] (y = nullptr: sum_i x[i]), accumulated in T per lane, returned as T.
template <typename T>
inline T row_dot(const T* x, const T* y, int64_t n) {
  const int64_t n16 = n - n % kLanes;
  T s = T(0);
  if (n16 > 0) {
    T lane[kLanes] = {};
    if (y == nullptr) {
      for (int64_t i = 0; i < n16; i += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) lane[j] += x[i + j];
    } else {
      for (int64_t i = 0; i < n16; i += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) lane[j] += x[i + j] * y[i + j];
    }
    for (int64_t j = 0; j < kLanes; ++j) s += lane[j];
  }
  if (y == nullptr) {
    for (int64_t i = n16; i < n; ++i) s += x[i];
  } else {
    for (int64_t i = n16; i < n; ++i) s += x[i] * y[i];
  }
  return s;
}

template <typename T>
inline T row_sum(const T* x, int64_t n) {
  return row_dot<T>(x, nullptr, n);
}

// out[i] <- base[i] + a * u[i] + b * v[i] for i < n.
void combine_row(const float* base, const float* u, const float* v, float a, float b, float* out, int64_t n);
void combine_row(const double* base, const double* u, const double* v, double a, double b, double* out, int64_t n);

// s0[i] += row[i]; s1[i] += a * row[i]; s2[i] += b * row[i] (accumulators in double).
void accumulate3(const float* row, double a, double b, double* s0, double* s1, double* s2, int64_t n);
void accumulate3(const double* row, double a, double b, double* s0, double* s1, double* s2, int64_t n);

}  // namespace cpu
}  // namespace fastland
