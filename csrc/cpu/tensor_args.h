// Argument handling shared by the fastland CPU ops (csrc/<op>.cpp).
#pragma once

#include <ATen/ATen.h>

namespace fastland {
namespace cpu {

// The checks every entry point makes: a CPU floating-point tensor.
inline void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, ": expected a floating-point tensor, got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (that of ",
              ref_name, "), got ", t.scalar_type());
}

// `t` and `other` CPU floating-point tensors of one dtype (that of `other`).
inline void check_pair(const at::Tensor& t, const at::Tensor& other, const char* name, const char* other_name) {
  check_input(t, name);
  check_input(other, other_name);
  check_same_dtype(t, other, name, other_name);
}

// The dtype the kernels compute `dtype` inputs in: float32 for half precision.
inline at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// `t` contiguous, in the compute dtype of `dtype` (a no-op when it already is).
inline at::Tensor prepared(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(compute_dtype(dtype)).contiguous();
}

}  // namespace cpu
}  // namespace fastland
