// The window maxima and first-maximum indices of a stride = kernel 2-D max-pool, on CPU.
//
// PyTorch's CPU max_pool2d_with_indices branches on every comparison (a mispredicted branch
// per input on real data); these loops select without branches, per output row, and the
// 2 x 2 case (LeNet-5, DDNet) reads each window's two input rows at once, compiled per
// instruction set. The result is bitwise PyTorch's: `value > best || isnan(value)` replaces,
// scanning each window in row-major order, from -inf at the window's first entry.
// OpenMP (at::parallel_for) over planes.
#include "cpu/max_pool.h"

#include <cmath>
#include <limits>

#include <ATen/Parallel.h>

#include "cpu/target_clones.h"
#include "cpu/tensor_args.h"


namespace fastland {
namespace cpu {
namespace {

// One plane, 2 x 2 windows: z [H, W] -> out, idx [ho, wo].
template <typename T>
FASTLAND_TARGET_CLONES void plane_2x2(const T* z, T* out, int64_t* idx, int64_t ho, int64_t wo, int64_t W) {
  for (int64_t oh = 0; oh < ho; ++oh) {
    const T* r0 = z + 2 * oh * W;
    const T* r1 = r0 + W;
    const int64_t base = 2 * oh * W;
    T* o = out + oh * wo;
    int64_t* at = idx + oh * wo;
    for (int64_t ow = 0; ow < wo; ++ow) {
      const T a = r0[2 * ow], b = r0[2 * ow + 1], c = r1[2 * ow], d = r1[2 * ow + 1];
      const T start = -std::numeric_limits<T>::infinity();
      bool take = (a > start) | (a != a);
      T best = take ? a : start;
      int64_t off = 0;
      take = (b > best) | (b != b);
      best = take ? b : best;
      off = take ? 1 : off;
      take = (c > best) | (c != c);
      best = take ? c : best;
      off = take ? W : off;
      take = (d > best) | (d != d);
      best = take ? d : best;
      off = take ? W + 1 : off;
      o[ow] = best;
      at[ow] = base + 2 * ow + off;
    }
  }
}

// One plane, any kh x kw windows: the same rule, one output row at a time.
template <typename T>
void plane_any(const T* z, T* out, int64_t* idx, int64_t ho, int64_t wo, int64_t W, int64_t kh, int64_t kw) {
  for (int64_t oh = 0; oh < ho; ++oh) {
    T* best = out + oh * wo;
    int64_t* at = idx + oh * wo;
    for (int64_t ow = 0; ow < wo; ++ow) {
      best[ow] = -std::numeric_limits<T>::infinity();
      at[ow] = oh * kh * W + ow * kw;
    }
    for (int64_t i = 0; i < kh; ++i) {
      const int64_t row = (oh * kh + i) * W;
      for (int64_t j = 0; j < kw; ++j) {
        const T* src = z + row + j;
        for (int64_t ow = 0; ow < wo; ++ow) {
          const T v = src[ow * kw];
          const bool take = (v > best[ow]) | (v != v);
          best[ow] = take ? v : best[ow];
          at[ow] = take ? row + j + ow * kw : at[ow];
        }
      }
    }
  }
}

template <typename T>
void pool_impl(const T* z, T* out, int64_t* idx, int64_t planes, int64_t H, int64_t W, int64_t kh, int64_t kw) {
  const int64_t ho = H / kh, wo = W / kw;
  at::parallel_for(0, planes, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const T* zp = z + p * H * W;
      T* op = out + p * ho * wo;
      int64_t* ip = idx + p * ho * wo;
      if (kh == 2 && kw == 2)
        plane_2x2<T>(zp, op, ip, ho, wo, W);
      else
        plane_any<T>(zp, op, ip, ho, wo, W, kh, kw);
    }
  });
}

}  // namespace

std::vector<at::Tensor> max_pool2d(const at::Tensor& z_in, int64_t kh, int64_t kw) {
  check_input(z_in, "z");
  TORCH_CHECK(z_in.dim() == 4, "z: expected shape [n, C, H, W], got ", z_in.sizes());
  TORCH_CHECK(z_in.scalar_type() == at::kFloat || z_in.scalar_type() == at::kDouble,
              "z: expected float32 or float64, got ", z_in.scalar_type());
  TORCH_CHECK(kh >= 1 && kw >= 1, "kernel: expected positive sizes, got ", kh, " x ", kw);
  TORCH_CHECK(z_in.size(2) >= kh && z_in.size(3) >= kw, "z: expected a plane of at least ", kh, " x ", kw,
              ", got ", z_in.sizes());
  const at::Tensor z = z_in.contiguous();
  const int64_t n = z.size(0), c = z.size(1), H = z.size(2), W = z.size(3);
  at::Tensor out = at::empty({n, c, H / kh, W / kw}, z.options());
  at::Tensor idx = at::empty({n, c, H / kh, W / kw}, z.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fastland_max_pool2d", [&] {
    pool_impl<scalar_t>(z.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                        idx.mutable_data_ptr<int64_t>(), n * c, H, W, kh, kw);
  });
  return {out, idx};
}

}  // namespace cpu
}  // namespace fastland
