// Definitions of the row primitives declared in vec_math.h (see there).
#include "vec_math.h"

#include <cmath>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__)
// Without these GCC keeps the clamps of exp_poly as branches (a float->int
// conversion "may trap"), and the loop does not vectorise. No code here relies
// on floating-point exceptions or errno.
#pragma GCC optimize("no-trapping-math", "no-math-errno")
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTLAND_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTLAND_CLONES
#endif

namespace fastland {
namespace cpu {
namespace {

// exp(x) for float without branches the vectoriser cannot handle: Cody-Waite
// range reduction x = n ln2 + r, |r| <= ln2/2, Cephes' degree-6 polynomial
// for exp(r), and 2^n built in the exponent bits.
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

}  // namespace

constexpr int64_t kLanes = 16;

template <typename T>
inline T row_max_impl(const T* x, int64_t n) {
  T lane[kLanes];
  const int64_t n16 = n - n % kLanes;
  if (n16 == 0) {
    T m = x[0];
    for (int64_t i = 1; i < n; ++i) m = x[i] > m ? x[i] : m;
    return m;
  }
  for (int64_t j = 0; j < kLanes; ++j) lane[j] = x[j];
  for (int64_t i = kLanes; i < n16; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) lane[j] = x[i + j] > lane[j] ? x[i + j] : lane[j];
  T m = lane[0];
  for (int64_t j = 1; j < kLanes; ++j) m = lane[j] > m ? lane[j] : m;
  for (int64_t i = n16; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

template <typename T>
inline double row_dot_impl(const T* x, const T* y, int64_t n) {
  T lane[kLanes] = {};
  const int64_t n16 = n - n % kLanes;
  for (int64_t i = 0; i < n16; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) lane[j] += x[i + j] * y[i + j];
  double s = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) s += lane[j];
  for (int64_t i = n16; i < n; ++i) s += static_cast<double>(x[i]) * y[i];
  return s;
}

template <typename T>
inline double row_sum_impl(const T* x, int64_t n) {
  T lane[kLanes] = {};
  const int64_t n16 = n - n % kLanes;
  for (int64_t i = 0; i < n16; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) lane[j] += x[i + j];
  double s = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) s += lane[j];
  for (int64_t i = n16; i < n; ++i) s += x[i];
  return s;
}

FASTLAND_CLONES float row_max(const float* x, int64_t n) { return row_max_impl(x, n); }
FASTLAND_CLONES double row_max(const double* x, int64_t n) { return row_max_impl(x, n); }
FASTLAND_CLONES double row_sum(const float* x, int64_t n) { return row_sum_impl(x, n); }
FASTLAND_CLONES double row_sum(const double* x, int64_t n) { return row_sum_impl(x, n); }
FASTLAND_CLONES double row_dot(const float* x, const float* y, int64_t n) { return row_dot_impl(x, y, n); }
FASTLAND_CLONES double row_dot(const double* x, const double* y, int64_t n) { return row_dot_impl(x, y, n); }

FASTLAND_CLONES void exp_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = exp_poly(x[i]);
}

void exp_inplace(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

FASTLAND_CLONES void combine_row(const float* base, const float* u, const float* v, float a, float b,
                                 float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = base[i] + a * u[i] + b * v[i];
}

FASTLAND_CLONES void combine_row(const double* base, const double* u, const double* v, double a, double b,
                                 double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = base[i] + a * u[i] + b * v[i];
}

FASTLAND_CLONES void accumulate3(const float* row, double a, double b, double* s0, double* s1, double* s2,
                                 int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double r = row[i];
    s0[i] += r;
    s1[i] += a * r;
    s2[i] += b * r;
  }
}

FASTLAND_CLONES void accumulate3(const double* row, double a, double b, double* s0, double* s1, double* s2,
                                 int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double r = row[i];
    s0[i] += r;
    s1[i] += a * r;
    s2[i] += b * r;
  }
}

}  // namespace cpu
}  // namespace fastland
