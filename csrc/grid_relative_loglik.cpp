// CPU kernels of the fused ops fastland::grid_relative_loglik and
// fastland::grid_relative_loglik_backward, registered under the ops' own schemas
// (defined in fastland/ops/grid_relative_loglik.py). OpenMP (at::parallel_for) over blocks of
// grid points; float32/float64 natively, half precision computed in float32; any strides.
//
// forward:  logits [N, G, C], base_lse [N] -> out [N, G] = logsumexp(logits[n, g]) - base_lse[n]
// backward: grad_out [N, G], logits [N, G, C] -> grad_logits = grad_out[n, g] * softmax(logits[n, g])
//           (the gradient to base_lse, -sum_g grad_out, is one reduction left to PyTorch)
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/row_kernels.h"
#include "cpu/tensor_args.h"

namespace fastland {
namespace cpu {
namespace {

void check_logits(const at::Tensor& logits) {
  check_input(logits, "logits");
  TORCH_CHECK(logits.dim() == 3, "logits: expected shape [N, G, C], got ", logits.sizes());
  TORCH_CHECK(logits.size(2) >= 1, "logits: expected at least one class, got ", logits.sizes());
}

template <typename T>
void forward_impl(const T* z, const T* base, T* out, int64_t N, int64_t G, int64_t C) {
  const int64_t R = N * G;
  const int64_t block = rows_per_block(C);
  const int64_t n_blocks = (R + block - 1) / block;
  at::parallel_for(0, n_blocks, 1, [&](int64_t blk0, int64_t blk1) {
    std::vector<T> work(block * C);
    std::vector<T> sums(block);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t r0 = blk * block;
      const int64_t rows = std::min(block, R - r0);
      // float rows of C <= 16: 16 rows per AVX-512 register (where the CPU has it)
      const int64_t done = lse_short_rows(z + r0 * C, rows, C, out + r0);
      if (done < rows)
        softmax_rows(z + (r0 + done) * C, rows - done, C, work.data(), out + r0 + done, sums.data(), false);
      // subtract base_lse[n] over the rows' runs of constant n (no division per row)
      for (int64_t r = r0; r < r0 + rows;) {
        const int64_t n = r / G;
        const int64_t stop = std::min(r0 + rows, (n + 1) * G);
        const T b = base[n];
        for (; r < stop; ++r) out[r] -= b;
      }
    }
  });
}

template <typename T>
void backward_impl(const T* gout, const T* z, T* gz, int64_t R, int64_t C) {
  const int64_t block = rows_per_block(C);
  const int64_t n_blocks = (R + block - 1) / block;
  at::parallel_for(0, n_blocks, 1, [&](int64_t blk0, int64_t blk1) {
    std::vector<T> lse(block);
    std::vector<T> sums(block);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t r0 = blk * block;
      const int64_t rows = std::min(block, R - r0);
      T* out = gz + r0 * C;
      softmax_rows(z + r0 * C, rows, C, out, lse.data(), sums.data(), true);
      for (int64_t r = 0; r < rows; ++r) {
        const T g = gout[r0 + r];
        for (int64_t c = 0; c < C; ++c) out[r * C + c] *= g;
      }
    }
  });
}

at::Tensor grid_relative_loglik_forward(const at::Tensor& logits_in, const at::Tensor& base_lse_in) {
  check_logits(logits_in);
  check_input(base_lse_in, "base_lse");
  check_same_dtype(base_lse_in, logits_in, "base_lse", "logits");
  TORCH_CHECK(base_lse_in.dim() == 1 && base_lse_in.size(0) == logits_in.size(0), "base_lse: expected shape [",
              logits_in.size(0), "], got ", base_lse_in.sizes());
  const at::ScalarType dtype = logits_in.scalar_type();
  const at::Tensor logits = prepared(logits_in, dtype), base_lse = prepared(base_lse_in, dtype);
  const int64_t N = logits.size(0), G = logits.size(1), C = logits.size(2);
  at::Tensor out = at::empty({N, G}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "grid_relative_loglik", [&] {
    forward_impl<scalar_t>(logits.const_data_ptr<scalar_t>(), base_lse.const_data_ptr<scalar_t>(),
                           out.mutable_data_ptr<scalar_t>(), N, G, C);
  });
  return out.to(dtype);
}

at::Tensor grid_relative_loglik_backward(const at::Tensor& grad_out_in, const at::Tensor& logits_in) {
  check_logits(logits_in);
  check_input(grad_out_in, "grad_out");
  check_same_dtype(grad_out_in, logits_in, "grad_out", "logits");
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.size(0) == logits_in.size(0) &&
                  grad_out_in.size(1) == logits_in.size(1),
              "grad_out: expected shape [", logits_in.size(0), ", ", logits_in.size(1), "], got ", grad_out_in.sizes());
  const at::ScalarType dtype = logits_in.scalar_type();
  const at::Tensor grad_out = prepared(grad_out_in, dtype), logits = prepared(logits_in, dtype);
  at::Tensor gz = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "grid_relative_loglik_backward", [&] {
    backward_impl<scalar_t>(grad_out.const_data_ptr<scalar_t>(), logits.const_data_ptr<scalar_t>(),
                            gz.mutable_data_ptr<scalar_t>(), logits.size(0) * logits.size(1), logits.size(2));
  });
  return gz.to(dtype);
}

}  // namespace
}  // namespace cpu
}  // namespace fastland

TORCH_LIBRARY_IMPL(fastland, CPU, m) {
  m.impl("grid_relative_loglik", &fastland::cpu::grid_relative_loglik_forward);
  m.impl("grid_relative_loglik_backward", &fastland::cpu::grid_relative_loglik_backward);
}
