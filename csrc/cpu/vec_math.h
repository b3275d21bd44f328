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

// max_i x[i] (n >= 1) and sum_i x[i], with 16 independent lanes (vectorised, and
// more accurate than one running sum); sums are returned in double.
float row_max(const float* x, int64_t n);
double row_max(const double* x, int64_t n);
double row_sum(const float* x, int64_t n);
double row_sum(const double* x, int64_t n);
// sum_i x[i] * y[i], 16 lanes, returned in double.
double row_dot(const float* x, const float* y, int64_t n);
double row_dot(const double* x, const double* y, int64_t n);

// x[i] <- exp(x[i]) for i < n. float: |rel. error| < 3e-7, exp(x) = 0 for x < -87.
void exp_inplace(float* x, int64_t n);
void exp_inplace(double* x, int64_t n);

// out[i] <- base[i] + a * u[i] + b * v[i] for i < n.
void combine_row(const float* base, const float* u, const float* v, float a, float b, float* out, int64_t n);
void combine_row(const double* base, const double* u, const double* v, double a, double b, double* out, int64_t n);

// s0[i] += row[i]; s1[i] += a * row[i]; s2[i] += b * row[i] (accumulators in double).
void accumulate3(const float* row, double a, double b, double* s0, double* s1, double* s2, int64_t n);
void accumulate3(const double* row, double a, double b, double* s0, double* s1, double* s2, int64_t n);

}  // namespace cpu
}  // namespace fastland
