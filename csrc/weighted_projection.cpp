// CPU kernels of the fused ops fastland::weighted_projection and
// fastland::weighted_projection_backward, registered under the ops' own schemas
// (defined in fastland/ops/weighted_projection.py). OpenMP (at::parallel_for) over blocks of rows;
// float32/float64 natively, half precision computed in float32; any strides.
//
// forward:  logits [B, C], noise [P, B, C] -> cot [P, B, C], lse [B]
//           v = noise / ||noise|| per row (v = 1 when C = 1), cot = v * softmax(z) (or v).
// backward: grad_cot [P, B, C], grad_lse [B], logits, noise -> grad_logits [B, C]
//           w = sum_p grad_cot_p * v_p, grad = s * (grad_lse + w - <w, s>)  (softmax weight)
//           grad = grad_lse * s                                              (uniform weight)
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/row_kernels.h"
#include "cpu/tensor_args.h"

namespace fastland {
namespace cpu {
namespace {

void check_args(const at::Tensor& logits, const at::Tensor& noise) {
  check_input(logits, "logits");
  check_input(noise, "noise");
  check_same_dtype(noise, logits, "noise", "logits");
  TORCH_CHECK(logits.dim() == 2, "logits: expected shape [B, C], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1, "logits: expected at least one class, got ", logits.sizes());
  TORCH_CHECK(noise.dim() == 3 && noise.size(1) == logits.size(0) && noise.size(2) == logits.size(1),
              "noise: expected shape [P, ", logits.size(0), ", ", logits.size(1), "], got ", noise.sizes());
}

template <typename T>
void forward_impl(const T* z, const T* noise, T* cot, T* lse, int64_t P, int64_t B, int64_t C, bool softmax) {
  const int64_t block = rows_per_block(C);
  const int64_t n_blocks = (B + block - 1) / block;
  at::parallel_for(0, n_blocks, 1, [&](int64_t blk0, int64_t blk1) {
    std::vector<T> prob(block * C);
    std::vector<T> sums(block);
    std::vector<T> inv(block);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t r0 = blk * block;
      const int64_t rows = std::min(block, B - r0);
      softmax_rows(z + r0 * C, rows, C, prob.data(), lse + r0, sums.data(), true);
      for (int64_t p = 0; p < P; ++p) {
        const int64_t off0 = (p * B + r0) * C;
        T* out0 = cot + off0;
        if (C == 1) {  // v = 1, softmax of one logit = 1
          for (int64_t r = 0; r < rows; ++r) out0[r] = T(1);
          continue;
        }
        project_rows(noise + off0, softmax ? prob.data() : static_cast<const T*>(nullptr), rows, C, inv.data(),
                     out0);
      }
    }
  });
}

template <typename T>
void backward_impl(const T* gcot, const T* glse, const T* z, const T* noise, T* gz, int64_t P, int64_t B, int64_t C,
                   bool softmax) {
  const int64_t block = rows_per_block(C);
  const int64_t n_blocks = (B + block - 1) / block;
  at::parallel_for(0, n_blocks, 1, [&](int64_t blk0, int64_t blk1) {
    std::vector<T> prob(block * C);
    std::vector<T> w(block * C);
    std::vector<T> lse(block);
    std::vector<T> sums(block);
    std::vector<T> inv(block);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t r0 = blk * block;
      const int64_t rows = std::min(block, B - r0);
      softmax_rows(z + r0 * C, rows, C, prob.data(), lse.data(), sums.data(), true);
      if (!softmax) {
        for (int64_t r = 0; r < rows; ++r) {
          const T g = glse[r0 + r];
          const T* pr = prob.data() + r * C;
          T* out = gz + (r0 + r) * C;
          for (int64_t c = 0; c < C; ++c) out[c] = g * pr[c];
        }
        continue;
      }
      std::fill(w.begin(), w.begin() + rows * C, T(0));
      for (int64_t p = 0; p < P; ++p) {
        const int64_t off0 = (p * B + r0) * C;
        const T* g0 = gcot + off0;
        if (C == 1) {  // v = 1
          for (int64_t r = 0; r < rows; ++r) w[r] += g0[r];
          continue;
        }
        accumulate_projection(g0, noise + off0, rows, C, inv.data(), w.data());
      }
      softmax_backward_rows(prob.data(), w.data(), glse + r0, rows, C, gz + r0 * C);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> weighted_projection_forward(const at::Tensor& logits_in, const at::Tensor& noise_in,
                                                               bool softmax) {
  check_args(logits_in, noise_in);
  const at::ScalarType dtype = logits_in.scalar_type();
  const at::Tensor logits = prepared(logits_in, dtype), noise = prepared(noise_in, dtype);
  const int64_t P = noise.size(0), B = logits.size(0), C = logits.size(1);
  at::Tensor cot = at::empty_like(noise);
  at::Tensor lse = at::empty({B}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "weighted_projection", [&] {
    forward_impl<scalar_t>(logits.const_data_ptr<scalar_t>(), noise.const_data_ptr<scalar_t>(),
                           cot.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>(), P, B, C, softmax);
  });
  return {cot.to(dtype), lse.to(dtype)};
}

at::Tensor weighted_projection_backward(const at::Tensor& grad_cot_in, const at::Tensor& grad_lse_in,
                                        const at::Tensor& logits_in, const at::Tensor& noise_in, bool softmax) {
  check_args(logits_in, noise_in);
  check_input(grad_cot_in, "grad_cot");
  check_input(grad_lse_in, "grad_lse");
  check_same_dtype(grad_cot_in, logits_in, "grad_cot", "logits");
  check_same_dtype(grad_lse_in, logits_in, "grad_lse", "logits");
  TORCH_CHECK(grad_cot_in.sizes() == noise_in.sizes(), "grad_cot: expected shape ", noise_in.sizes(), ", got ",
              grad_cot_in.sizes());
  TORCH_CHECK(grad_lse_in.dim() == 1 && grad_lse_in.size(0) == logits_in.size(0), "grad_lse: expected shape [",
              logits_in.size(0), "], got ", grad_lse_in.sizes());
  const at::ScalarType dtype = logits_in.scalar_type();
  const at::Tensor grad_cot = prepared(grad_cot_in, dtype), grad_lse = prepared(grad_lse_in, dtype);
  const at::Tensor logits = prepared(logits_in, dtype), noise = prepared(noise_in, dtype);
  const int64_t P = noise.size(0), B = logits.size(0), C = logits.size(1);
  at::Tensor gz = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "weighted_projection_backward", [&] {
    backward_impl<scalar_t>(grad_cot.const_data_ptr<scalar_t>(), grad_lse.const_data_ptr<scalar_t>(),
                            logits.const_data_ptr<scalar_t>(), noise.const_data_ptr<scalar_t>(),
                            gz.mutable_data_ptr<scalar_t>(), P, B, C, softmax);
  });
  return gz.to(dtype);
}

}  // namespace
}  // namespace cpu
}  // namespace fastland

TORCH_LIBRARY_IMPL(fastland, CPU, m) {
  m.impl("weighted_projection", &fastland::cpu::weighted_projection_forward);
  m.impl("weighted_projection_backward", &fastland::cpu::weighted_projection_backward);
}
