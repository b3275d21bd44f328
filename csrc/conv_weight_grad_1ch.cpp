// The weight (and bias) gradient of a 2-D convolution with one input channel (LeNet-5's first
// layer), on CPU: dw[o, a, c] = sum over images and outputs (i, j) of x[i + a - ph, j + c - pw] * g[o, i, j],
// db[o] = sum of g[o].
//
// oneDNN's backward-weights for one input channel runs at a fraction of the machine's multiply-add
// rate. Here each thread keeps, across its images, a zero-padded plane of x and a copy of each image's
// g in rows aligned and zero-padded to whole vector pairs (csrc/cpu/padded_plane.h); per output
// channel o and kernel row a, each vector of a g row is loaded once and multiplied with the kw
// shifted vectors of the plane's row i + a, accumulating in 2 kw independent vector sums held in registers (the kernel width
// is a compile-time constant, up to 7; wider kernels take PyTorch's own), compiled per instruction
// set. Each block of 8 images adds its sums to per-lane totals of its own, which are summed in one
// fixed order at the end: the result does not depend on the number of threads, and differs from
// PyTorch's by rounding only.
#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu/conv_one_channel.h"
#include "cpu/padded_plane.h"
#include "cpu/target_clones.h"
#include "cpu/tensor_args.h"

namespace fastland {
namespace cpu {
namespace {

constexpr int64_t kMaxWidth = 7;  // widest kernel with a compiled instance
constexpr int64_t kImagesPerBlock = 8;  // images whose sums one thread adds up before the fixed-order total

// Lanes of one 64-byte vector of T.
template <typename T>
constexpr int64_t lanes() {
  return 64 / static_cast<int64_t>(sizeof(T));
}

// One image: adds to `total` [O, kh, KW, lanes] the per-lane sums of plane[i + a, j + c] * g[o, i, j], and,
// when `total_b` [O, lanes] is given, the per-lane sums of g[o]. `gpad` [O, Ho, Wg] holds g with zero
// columns up to a whole number of vector pairs (Wg); the plane holds x at (ph, pw) in rows of
// Wp >= Wg + KW - 1 elements. The two vectors of a pair keep separate sums: 2 KW independent chains.
template <typename T, int KW>
FASTLAND_TARGET_CLONES void image(const T* plane, const T* gpad, T* total, T* total_b, int64_t O, int64_t kh,
                                int64_t Ho, int64_t Wg, int64_t Wp) {
  constexpr int64_t L = lanes<T>();
  for (int64_t o = 0; o < O; ++o) {
    const T* go = gpad + o * Ho * Wg;
    for (int64_t a = 0; a < kh; ++a) {
      T acc[2][KW][L] = {};
      for (int64_t i = 0; i < Ho; ++i) {
        const T* prow = plane + (i + a) * Wp;
        const T* grow = go + i * Wg;
        for (int64_t j0 = 0; j0 < Wg; j0 += 2 * L) {
          for (int64_t h = 0; h < 2; ++h) {
            for (int c = 0; c < KW; ++c) {
#pragma omp simd
              for (int64_t l = 0; l < L; ++l) acc[h][c][l] += prow[j0 + h * L + c + l] * grow[j0 + h * L + l];
            }
          }
        }
      }
      T* t = total + (o * kh + a) * KW * L;
      for (int c = 0; c < KW; ++c) {
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) t[c * L + l] += acc[0][c][l] + acc[1][c][l];
      }
    }
    if (total_b != nullptr) {
      T accb[L] = {};
      for (int64_t i = 0; i < Ho * Wg; i += L) {
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) accb[l] += go[i + l];
      }
      for (int64_t l = 0; l < L; ++l) total_b[o * L + l] += accb[l];
    }
  }
}

// The blocks [lo, hi) of kImagesPerBlock images for kernel width KW, block k adding to `totals` + k `stride`:
// per image, x into the plane and g into gpad (aligned rows, zero-padded: cheaper than reading g's rows in
// place, measured), then `image`. One plane and one gpad for all the blocks.
template <typename T, int KW>
void blocks_of_images(const T* xp, const T* gp, T* totals, int64_t stride, bool bias, int64_t lo, int64_t hi,
                      int64_t B, int64_t O, int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t kh, int64_t ph,
                      int64_t pw) {
  constexpr int64_t L = lanes<T>();
  const int64_t Wg = round_up(Wo, 2 * L), Hp = Ho + kh - 1, Wp = round_up(Wg + KW - 1, L);
  std::vector<T> plane(Hp * Wp, T(0)), gpad(O * Ho * Wg, T(0));
  for (int64_t k = lo; k < hi; ++k) {
    T* total = totals + k * stride;
    for (int64_t n = k * kImagesPerBlock; n < std::min(B, (k + 1) * kImagesPerBlock); ++n) {
      copy_into_plane(xp + n * H * W, H, W, plane.data(), Wp, ph, pw);
      for (int64_t o = 0; o < O; ++o)
        copy_into_plane(gp + (n * O + o) * Ho * Wo, Ho, Wo, gpad.data() + o * Ho * Wg, Wg, 0, 0);
      image<T, KW>(plane.data(), gpad.data(), total, bias ? total + O * kh * KW * L : nullptr, O, kh, Ho, Wg, Wp);
    }
  }
}

template <typename T>
void blocks_any_width(int64_t kw, const T* xp, const T* gp, T* totals, int64_t stride, bool bias, int64_t lo,
                      int64_t hi, int64_t B, int64_t O, int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t kh,
                      int64_t ph, int64_t pw) {
  switch (kw) {
    case 1: return blocks_of_images<T, 1>(xp, gp, totals, stride, bias, lo, hi, B, O, H, W, Ho, Wo, kh, ph, pw);
    case 2: return blocks_of_images<T, 2>(xp, gp, totals, stride, bias, lo, hi, B, O, H, W, Ho, Wo, kh, ph, pw);
    case 3: return blocks_of_images<T, 3>(xp, gp, totals, stride, bias, lo, hi, B, O, H, W, Ho, Wo, kh, ph, pw);
    case 4: return blocks_of_images<T, 4>(xp, gp, totals, stride, bias, lo, hi, B, O, H, W, Ho, Wo, kh, ph, pw);
    case 5: return blocks_of_images<T, 5>(xp, gp, totals, stride, bias, lo, hi, B, O, H, W, Ho, Wo, kh, ph, pw);
    case 6: return blocks_of_images<T, 6>(xp, gp, totals, stride, bias, lo, hi, B, O, H, W, Ho, Wo, kh, ph, pw);
    default: return blocks_of_images<T, 7>(xp, gp, totals, stride, bias, lo, hi, B, O, H, W, Ho, Wo, kh, ph, pw);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> conv_weight_grad_1ch(const at::Tensor& x, const at::Tensor& g, int64_t kh,
                                                        int64_t kw, int64_t ph, int64_t pw, bool bias) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) == 1 && g.dim() == 4 && g.size(0) == x.size(0),
              "conv_weight_grad_1ch: expected x [B, 1, H, W] and g [B, O, Ho, Wo], got ", x.sizes(), " and ",
              g.sizes());
  check_pair(g, x, "g", "x");
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3), O = g.size(1), Ho = g.size(2), Wo = g.size(3);
  TORCH_CHECK(kh >= 1 && kw >= 1 && ph >= 0 && pw >= 0 && Ho == H + 2 * ph - kh + 1 && Wo == W + 2 * pw - kw + 1,
              "conv_weight_grad_1ch: g's spatial size ", g.sizes(), " does not match x ", x.sizes(), ", the kernel (",
              kh, ", ", kw, ") and the padding (", ph, ", ", pw, ")");
  if (kw > kMaxWidth) {  // no compiled instance: PyTorch's own
    const at::Tensor w_like = at::empty({O, 1, kh, kw}, x.options());
    const std::vector<int64_t> bias_sizes{O};
    auto grads = at::convolution_backward(g, x, w_like, bias ? at::OptionalIntArrayRef(bias_sizes) : c10::nullopt,
                                          {1, 1}, {ph, pw}, {1, 1}, false, {0, 0}, 1, {false, true, bias});
    return {std::get<1>(grads), bias ? std::get<2>(grads) : at::Tensor()};
  }
  const at::Tensor xc = x.contiguous(), gc = g.contiguous();
  const int64_t L = x.scalar_type() == at::kDouble ? lanes<double>() : lanes<float>();
  const int64_t blocks = (B + kImagesPerBlock - 1) / kImagesPerBlock;
  const int64_t rows = O * kh * kw + (bias ? O : 0);
  // per-lane totals of each block of images, added up in one fixed order below: the same result
  // whatever the number of threads
  at::Tensor totals = at::zeros({std::max<int64_t>(blocks, 1), rows, L}, x.options());
  at::Tensor sums = at::empty({rows}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_weight_grad_1ch", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    scalar_t* tp = totals.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
      blocks_any_width<scalar_t>(kw, xp, gp, tp, rows * L, bias, lo, hi, B, O, H, W, Ho, Wo, kh, ph, pw);
    });
    scalar_t* sp = sums.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {
      scalar_t s = 0;
      for (int64_t k = 0; k < blocks; ++k)
        for (int64_t l = 0; l < L; ++l) s += tp[(k * rows + r) * L + l];
      sp[r] = s;
    }
  });
  at::Tensor dw = sums.narrow(0, 0, O * kh * kw).reshape({O, 1, kh, kw});
  at::Tensor db = bias ? sums.narrow(0, O * kh * kw, O).clone() : at::Tensor();
  return {dw, db};
}

}  // namespace cpu
}  // namespace fastland
