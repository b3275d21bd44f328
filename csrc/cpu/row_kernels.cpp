// Out-of-line definitions of row_kernels.h: the block primitives and the long-row
// kernels compiled per instruction set, and the AVX-512 logsumexp of short rows.
#if defined(__GNUC__) && !defined(__clang__)
// Without these GCC keeps the clamps of exp_poly as branches (a float->int
// conversion "may trap"), and the loop does not vectorise. No code here relies
// on floating-point exceptions or errno. (Before the header: its inline
// polynomials are compiled into the clones below.)
#pragma GCC optimize("no-trapping-math", "no-math-errno")
#endif

#include "row_kernels.h"

#include <cmath>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FASTLAND_HAVE_AVX512_PATH 1
#endif

// target_clones: one copy per instruction set, the best chosen when the library loads
// (GCC's ifunc resolver checks the CPU at run time).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTLAND_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTLAND_CLONES
#endif

namespace fastland {
namespace cpu {

// The long-row kernels: the templates of row_kernels.h with InlineMath, compiled per
// instruction set so that the inlined polynomials vectorise for each.
#define FASTLAND_ROW_KERNELS(T)                                                                                   \
  FASTLAND_CLONES void softmax_rows_wide(const T* z, int64_t rows, int64_t C, T* work, T* lse, T* sums,          \
                                         bool normalise) {                                                      \
    softmax_rows_impl<T, InlineMath>(z, rows, C, work, lse, sums, normalise);                                   \
  }                                                                                                             \
  FASTLAND_CLONES void project_rows_wide(const T* noise, const T* prob, int64_t rows, int64_t C, T* inv,        \
                                         T* out) {                                                              \
    project_rows_impl<T, InlineMath>(noise, prob, rows, C, inv, out);                                           \
  }                                                                                                             \
  FASTLAND_CLONES void accumulate_projection_wide(const T* g, const T* noise, int64_t rows, int64_t C, T* inv,  \
                                                  T* w) {                                                       \
    accumulate_projection_impl<T, InlineMath>(g, noise, rows, C, inv, w);                                       \
  }                                                                                                             \
  FASTLAND_CLONES void softmax_backward_rows_wide(const T* prob, const T* w, const T* glse, int64_t rows,       \
                                                  int64_t C, T* out) {                                          \
    softmax_backward_rows_impl(prob, w, glse, rows, C, out);                                                    \
  }

FASTLAND_ROW_KERNELS(float)
FASTLAND_ROW_KERNELS(double)
#undef FASTLAND_ROW_KERNELS

#ifdef FASTLAND_HAVE_AVX512_PATH
namespace {

// exp and log of 16 floats (the polynomials of exp_poly and log_poly, in AVX-512).
__attribute__((target("avx512f"))) inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}

__attribute__((target("avx512f"))) inline __m512 log512(__m512 x) {  // x > 0 finite
  __m512 e = _mm512_getexp_ps(x);                                     // floor(log2 x)
  __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);  // [1, 2)
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356237f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.0f));
  const __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.0f));
  const __m512 z = _mm512_mul_ps(f, f);
  __m512 y = _mm512_set1_ps(7.0376836292e-2f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.1514610310e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.1676998740e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.2420140846e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.4249322787e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.6668057665e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.0000714765e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-2.4999993993e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(3.3333331174e-1f));
  y = _mm512_mul_ps(_mm512_mul_ps(y, f), z);
  y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
  y = _mm512_fmadd_ps(z, _mm512_set1_ps(-0.5f), y);
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), _mm512_add_ps(f, y));
}

// 16 rows in the 16 lanes: column c of the group is one gather at stride C.
__attribute__((target("avx512f"))) int64_t lse_short_rows_avx512(const float* z, int64_t rows, int64_t C,
                                                                   float* lse) {
  const __m512i offs = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(static_cast<int>(C)));
  __m512 col[kShortRows];
  const int64_t full = rows - rows % 16;
  for (int64_t r0 = 0; r0 < full; r0 += 16) {
    const float* base = z + r0 * C;
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t c = 0; c < C; ++c) {
      col[c] = _mm512_i32gather_ps(offs, base + c, 4);
      m = _mm512_max_ps(m, col[c]);
    }
    __m512 s = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c) s = _mm512_add_ps(s, exp512(_mm512_sub_ps(col[c], m)));
    _mm512_storeu_ps(lse + r0, _mm512_add_ps(m, log512(s)));
  }
  return full;
}

}  // namespace
#endif

int64_t lse_short_rows(const float* z, int64_t rows, int64_t C, float* lse) {
#ifdef FASTLAND_HAVE_AVX512_PATH
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512 && C <= kShortRows && rows * C < (int64_t(1) << 31)) return lse_short_rows_avx512(z, rows, C, lse);
#endif
  (void)z, (void)rows, (void)C, (void)lse;
  return 0;
}

FASTLAND_CLONES void exp_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = exp_poly(x[i]);
}

void exp_inplace(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

FASTLAND_CLONES void log_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = log_poly(x[i]);
}

void log_inplace(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::log(x[i]);
}

FASTLAND_CLONES void rsqrt_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = 1.0f / std::sqrt(x[i]);
}

FASTLAND_CLONES void rsqrt_inplace(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = 1.0 / std::sqrt(x[i]);
}

FASTLAND_CLONES void combine_row(const float* base, const float* u, const float* v, float a, float b,
                                 float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = base[i] + a * u[i] + b * v[i];
}

FASTLAND_CLONES void combine_row(const double* base, const double* u, const double* v, double a, double b,
                                 double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = base[i] + a * u[i] + b * v[i];
}

namespace {
template <typename T>
inline void accumulate3_impl(const T* row, double a, double b, double* s0, double* s1, double* s2, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double r = row[i];
    s0[i] += r;
    s1[i] += a * r;
    s2[i] += b * r;
  }
}
}  // namespace

FASTLAND_CLONES void accumulate3(const float* row, double a, double b, double* s0, double* s1, double* s2,
                                 int64_t n) {
  accumulate3_impl(row, a, b, s0, s1, s2, n);
}

FASTLAND_CLONES void accumulate3(const double* row, double a, double b, double* s0, double* s1, double* s2,
                                 int64_t n) {
  accumulate3_impl(row, a, b, s0, s1, s2, n);
}

}  // namespace cpu
}  // namespace fastland
