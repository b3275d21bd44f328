// Row kernels of the fastland CPU ops: one templated copy.
//
// Every kernel works on a block of `rows` contiguous rows of length C. Each is a
// template over the element type T and a Math policy that says how a whole run of
// exp / log / rsqrt is computed:
//
//   BlockMath   calls the out-of-line primitives of row_kernels.cpp (exp_inplace, ...),
//               themselves compiled per instruction set (AVX-512, AVX2, baseline) and
//               chosen when the library loads. Short rows use it: one vectorised pass
//               over the whole block beats per-row set-up when C = 10.
//   InlineMath  the scalar polynomials below, inlined into the caller. row_kernels.cpp
//               instantiates the kernels with it inside functions compiled per
//               instruction set (*_wide), which long rows (C >= kWideRows) take.
//
// float uses polynomial exp/log accurate to ~2 ulp (glibc's expf does not vectorise
// without -ffast-math); double uses std::exp / std::log.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastland {
namespace cpu {

// --------------------------------------------------------------------------- primitives

// exp(x) for float without branches the vectoriser cannot handle: Cody-Waite range
// reduction x = n ln2 + r, |r| <= ln2/2, Cephes' degree-6 polynomial for exp(r), and
// 2^n built in the exponent bits. |rel. error| < 3e-7; exp(x) = 0 for x < -87.
inline float exp_poly(float x) {
  const float lo = -87.0f, hi = 88.0f;
  const float xc = x < lo ? lo : (x > hi ? hi : x);
  // floor(xc log2(e) + 1/2) by truncation of a positive number (no libcall: vectorises)
  const int32_t ni = static_cast<int32_t>(xc * 1.44269504088896341f + 128.5f) - 128;
  const float n = static_cast<float>(ni);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? 0.0f : p * scale;
}

// log(x) for float, x > 0 finite (Cephes' logf): x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// a degree-9 polynomial for log(1 + f), f = m - 1. |abs. error| < 3e-7 * max(1, |log x|).
inline float log_poly(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 127;
  const int32_t mbits = (bits & 0x007fffff) | 0x3f800000;
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const bool big = m > 1.41421356237f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float ef = static_cast<float>(e);
  y += -2.12194440e-4f * ef;
  y += -0.5f * z;
  return f + y + 0.693359375f * ef;
}

inline float exp_of(float x) { return exp_poly(x); }
inline double exp_of(double x) { return std::exp(x); }
inline float log_of(float x) { return log_poly(x); }
inline double log_of(double x) { return std::log(x); }

// Out-of-line block primitives (row_kernels.cpp), compiled per instruction set:
// x[i] <- exp(x[i]), log(x[i]) (x[i] > 0 finite), 1 / sqrt(x[i]) for i < n.
void exp_inplace(float* x, int64_t n);
void exp_inplace(double* x, int64_t n);
void log_inplace(float* x, int64_t n);
void log_inplace(double* x, int64_t n);
void rsqrt_inplace(float* x, int64_t n);
void rsqrt_inplace(double* x, int64_t n);

struct BlockMath {
  template <typename T>
  static void exp(T* x, int64_t n) { exp_inplace(x, n); }
  template <typename T>
  static void log(T* x, int64_t n) { log_inplace(x, n); }
  template <typename T>
  static void rsqrt(T* x, int64_t n) { rsqrt_inplace(x, n); }
};

struct InlineMath {
  template <typename T>
  static void exp(T* x, int64_t n) { for (int64_t i = 0; i < n; ++i) x[i] = exp_of(x[i]); }
  template <typename T>
  static void log(T* x, int64_t n) { for (int64_t i = 0; i < n; ++i) x[i] = log_of(x[i]); }
  template <typename T>
  static void rsqrt(T* x, int64_t n) { for (int64_t i = 0; i < n; ++i) x[i] = T(1) / std::sqrt(x[i]); }
};

// Row reductions: 16 independent lanes (vectorised for long rows, and more accurate
// than one running sum); a plain loop for rows shorter than 16.
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

// sum_i x[i] * y[i] (y = nullptr: sum_i x[i]), accumulated in T per lane.
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

// --------------------------------------------------------------------------- row kernels (the one copy)

// lse[r] = logsumexp(z[r, :]) (max-shifted: finite for |z| ~ 1e4); work[r, c] =
// softmax(z[r, :])_c when normalise, else exp(z[r, c] - max_r); sums: rows scalars of scratch.
template <typename T, typename Math>
inline void softmax_rows_impl(const T* z, int64_t rows, int64_t C, T* work, T* lse, T* sums, bool normalise) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* zr = z + r * C;
    const T m = row_max(zr, C);
    lse[r] = m;
    T* wr = work + r * C;
    for (int64_t c = 0; c < C; ++c) wr[c] = zr[c] - m;
  }
  Math::exp(work, rows * C);
  for (int64_t r = 0; r < rows; ++r) sums[r] = row_sum(work + r * C, C);
  if (normalise) {
    for (int64_t r = 0; r < rows; ++r) {
      T* wr = work + r * C;
      const T inv = T(1) / sums[r];
      for (int64_t c = 0; c < C; ++c) wr[c] *= inv;
    }
  }
  Math::log(sums, rows);
  for (int64_t r = 0; r < rows; ++r) lse[r] += sums[r];
}

// inv[r] = 1 / ||noise[r, :]||.
template <typename T, typename Math>
inline void inv_norms_impl(const T* noise, int64_t rows, int64_t C, T* inv) {
  for (int64_t r = 0; r < rows; ++r) inv[r] = row_dot(noise + r * C, noise + r * C, C);
  Math::rsqrt(inv, rows);
}

// out[r, c] = noise[r, c] / ||noise[r, :]|| * (prob ? prob[r, c] : 1); inv: rows scalars of scratch.
template <typename T, typename Math>
inline void project_rows_impl(const T* noise, const T* prob, int64_t rows, int64_t C, T* inv, T* out) {
  inv_norms_impl<T, Math>(noise, rows, C, inv);
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

// w[r, c] += g[r, c] * noise[r, c] / ||noise[r, :]||; inv: scratch.
template <typename T, typename Math>
inline void accumulate_projection_impl(const T* g, const T* noise, int64_t rows, int64_t C, T* inv, T* w) {
  inv_norms_impl<T, Math>(noise, rows, C, inv);
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
inline void softmax_backward_rows_impl(const T* prob, const T* w, const T* glse, int64_t rows, int64_t C, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* pr = prob + r * C;
    const T* wr = w + r * C;
    const T shift = glse[r] - row_dot(wr, pr, C);
    T* o = out + r * C;
    for (int64_t c = 0; c < C; ++c) o[c] = pr[c] * (wr[c] + shift);
  }
}

// The same kernels instantiated with InlineMath inside functions compiled per
// instruction set (row_kernels.cpp), for long rows.
#define FASTLAND_DECLARE_WIDE_ROW_KERNELS(T)                                                                   \
  void softmax_rows_wide(const T* z, int64_t rows, int64_t C, T* work, T* lse, T* sums, bool normalise);       \
  void project_rows_wide(const T* noise, const T* prob, int64_t rows, int64_t C, T* inv, T* out);             \
  void accumulate_projection_wide(const T* g, const T* noise, int64_t rows, int64_t C, T* inv, T* w);         \
  void softmax_backward_rows_wide(const T* prob, const T* w, const T* glse, int64_t rows, int64_t C, T* out);
FASTLAND_DECLARE_WIDE_ROW_KERNELS(float)
FASTLAND_DECLARE_WIDE_ROW_KERNELS(double)
#undef FASTLAND_DECLARE_WIDE_ROW_KERNELS

// Rows at least this long take the *_wide kernels; shorter ones the BlockMath
// instantiations (for 10-element rows AVX-512 row loops were measured slower:
// masked remainders and per-row set-up).
constexpr int64_t kWideRows = 64;

// Rows handled together: the shifted logits of a block are exponentiated in one
// contiguous (vectorised) pass, which matters when rows are short (C = 10).
inline int64_t rows_per_block(int64_t C) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)); }

// The entry points the ops call: dispatch on row length.
template <typename T>
void softmax_rows(const T* z, int64_t rows, int64_t C, T* work, T* lse, T* sums, bool normalise) {
  if (C >= kWideRows) return softmax_rows_wide(z, rows, C, work, lse, sums, normalise);
  softmax_rows_impl<T, BlockMath>(z, rows, C, work, lse, sums, normalise);
}

template <typename T>
void project_rows(const T* noise, const T* prob, int64_t rows, int64_t C, T* inv, T* out) {
  if (C >= kWideRows) return project_rows_wide(noise, prob, rows, C, inv, out);
  project_rows_impl<T, BlockMath>(noise, prob, rows, C, inv, out);
}

template <typename T>
void accumulate_projection(const T* g, const T* noise, int64_t rows, int64_t C, T* inv, T* w) {
  if (C >= kWideRows) return accumulate_projection_wide(g, noise, rows, C, inv, w);
  accumulate_projection_impl<T, BlockMath>(g, noise, rows, C, inv, w);
}

template <typename T>
void softmax_backward_rows(const T* prob, const T* w, const T* glse, int64_t rows, int64_t C, T* out) {
  if (C >= kWideRows) return softmax_backward_rows_wide(prob, w, glse, rows, C, out);
  softmax_backward_rows_impl(prob, w, glse, rows, C, out);
}

// logsumexp of short float rows (C <= kShortRows), 16 rows at a time in the lanes of
// AVX-512 registers: lse[r] for r < the returned count (a multiple of 16; 0 when the
// CPU lacks AVX-512 or C is too long); the caller finishes the remaining rows.
constexpr int64_t kShortRows = 16;
int64_t lse_short_rows(const float* z, int64_t rows, int64_t C, float* lse);
inline int64_t lse_short_rows(const double*, int64_t, int64_t, double*) { return 0; }

// out[i] <- base[i] + a * u[i] + b * v[i] for i < n.
void combine_row(const float* base, const float* u, const float* v, float a, float b, float* out, int64_t n);
void combine_row(const double* base, const double* u, const double* v, double a, double b, double* out, int64_t n);

// s0[i] += row[i]; s1[i] += a * row[i]; s2[i] += b * row[i] (accumulators in double).
void accumulate3(const float* row, double a, double b, double* s0, double* s1, double* s2, int64_t n);
void accumulate3(const double* row, double a, double b, double* s0, double* s1, double* s2, int64_t n);

}  // namespace cpu
}  // namespace fastland
