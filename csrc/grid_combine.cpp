// CPU kernels of the fused ops fastland::grid_combine and fastland::grid_combine_backward,
// registered under the ops' own schemas (defined in fastland/ops/grid_combine.py). OpenMP
// (at::parallel_for) over grid points; float32/float64 natively, half precision computed in
// float32; any strides.
//
// forward:  base, u, v [N, *S], a, b [G] -> out [N, G, *S],  out[n, g] = base[n] + a[g] u[n] + b[g] v[n]
// backward: grad_out [N, G, *S], a, b [G] -> (sum_g grad_out[n, g], sum_g a[g] grad_out[n, g],
//           sum_g b[g] grad_out[n, g]), each [N, *S] (the adjoint of the forward in base, u, v).
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/row_kernels.h"
#include "cpu/tensor_args.h"

namespace fastland {
namespace cpu {
namespace {

constexpr int64_t kTile = 1024;  // feature tile of the backward: 3 double accumulators stay in L1

void check_grid(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ref, const char* ref_name) {
  check_input(a, "a");
  check_input(b, "b");
  check_same_dtype(a, ref, "a", ref_name);
  check_same_dtype(b, ref, "b", ref_name);
  TORCH_CHECK(a.dim() == 1, "a: expected shape [G], got ", a.sizes());
  TORCH_CHECK(b.sizes() == a.sizes(), "b: expected shape ", a.sizes(), " (that of a), got ", b.sizes());
}

template <typename T>
void forward_impl(const T* base, const T* u, const T* v, const T* a, const T* b, T* out, int64_t N, int64_t G,
                  int64_t D) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
  at::parallel_for(0, N * G, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / G, g = i % G;
      combine_row(base + n * D, u + n * D, v + n * D, a[g], b[g], out + i * D, D);
    }
  });
}

template <typename T>
void backward_impl(const T* gout, const T* a, const T* b, T* g0, T* g1, T* g2, int64_t N, int64_t G, int64_t D) {
  const int64_t n_tiles = (D + kTile - 1) / kTile;
  at::parallel_for(0, N * n_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<double> acc(3 * kTile);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / n_tiles, d0 = (t % n_tiles) * kTile;
      const int64_t len = std::min(kTile, D - d0);
      double* s0 = acc.data();
      double* s1 = s0 + kTile;
      double* s2 = s1 + kTile;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t g = 0; g < G; ++g)
        accumulate3(gout + (n * G + g) * D + d0, static_cast<double>(a[g]), static_cast<double>(b[g]), s0, s1, s2,
                    len);
      const int64_t off = n * D + d0;
      for (int64_t d = 0; d < len; ++d) {
        g0[off + d] = static_cast<T>(s0[d]);
        g1[off + d] = static_cast<T>(s1[d]);
        g2[off + d] = static_cast<T>(s2[d]);
      }
    }
  });
}

at::Tensor grid_combine_forward(const at::Tensor& base_in, const at::Tensor& u_in, const at::Tensor& v_in,
                                const at::Tensor& a_in, const at::Tensor& b_in) {
  check_input(base_in, "base");
  check_input(u_in, "u");
  check_input(v_in, "v");
  check_same_dtype(u_in, base_in, "u", "base");
  check_same_dtype(v_in, base_in, "v", "base");
  TORCH_CHECK(base_in.dim() >= 1, "base: expected shape [N, *S], got ", base_in.sizes());
  TORCH_CHECK(u_in.sizes() == base_in.sizes(), "u: expected shape ", base_in.sizes(), " (that of base), got ",
              u_in.sizes());
  TORCH_CHECK(v_in.sizes() == base_in.sizes(), "v: expected shape ", base_in.sizes(), " (that of base), got ",
              v_in.sizes());
  check_grid(a_in, b_in, base_in, "base");
  const at::ScalarType dtype = base_in.scalar_type();
  const at::Tensor base = prepared(base_in, dtype), u = prepared(u_in, dtype), v = prepared(v_in, dtype);
  const at::Tensor a = prepared(a_in, dtype), b = prepared(b_in, dtype);
  const int64_t N = base.size(0), G = a.size(0);
  const int64_t D = N == 0 ? 0 : base.numel() / N;
  std::vector<int64_t> shape(base.sizes().begin(), base.sizes().end());
  shape.insert(shape.begin() + 1, G);
  at::Tensor out = at::empty(shape, base.options());
  if (out.numel() == 0) return out.to(dtype);
  AT_DISPATCH_FLOATING_TYPES(base.scalar_type(), "grid_combine", [&] {
    forward_impl<scalar_t>(base.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
                           v.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                           out.mutable_data_ptr<scalar_t>(), N, G, D);
  });
  return out.to(dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grid_combine_backward(const at::Tensor& grad_out_in,
                                                                     const at::Tensor& a_in, const at::Tensor& b_in) {
  check_input(grad_out_in, "grad_out");
  check_grid(a_in, b_in, grad_out_in, "grad_out");
  TORCH_CHECK(grad_out_in.dim() >= 2 && grad_out_in.size(1) == a_in.size(0), "grad_out: expected shape [N, ",
              a_in.size(0), ", *S], got ", grad_out_in.sizes());
  const at::ScalarType dtype = grad_out_in.scalar_type();
  const at::Tensor grad_out = prepared(grad_out_in, dtype), a = prepared(a_in, dtype), b = prepared(b_in, dtype);
  const int64_t N = grad_out.size(0), G = a.size(0);
  std::vector<int64_t> shape(grad_out.sizes().begin(), grad_out.sizes().end());
  shape.erase(shape.begin() + 1);
  int64_t D = 1;
  for (size_t i = 1; i < shape.size(); ++i) D *= shape[i];
  at::Tensor g0 = at::empty(shape, grad_out.options());
  at::Tensor g1 = at::empty(shape, grad_out.options());
  at::Tensor g2 = at::empty(shape, grad_out.options());
  if (N == 0 || D == 0) return {g0.to(dtype), g1.to(dtype), g2.to(dtype)};
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "grid_combine_backward", [&] {
    backward_impl<scalar_t>(grad_out.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
                            b.const_data_ptr<scalar_t>(), g0.mutable_data_ptr<scalar_t>(),
                            g1.mutable_data_ptr<scalar_t>(), g2.mutable_data_ptr<scalar_t>(), N, G, D);
  });
  return {g0.to(dtype), g1.to(dtype), g2.to(dtype)};
}

}  // namespace
}  // namespace cpu
}  // namespace fastland

TORCH_LIBRARY_IMPL(fastland, CPU, m) {
  m.impl("grid_combine", &fastland::cpu::grid_combine_forward);
  m.impl("grid_combine_backward", &fastland::cpu::grid_combine_backward);
}
