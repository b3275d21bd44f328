// The input gradient of a 2-D convolution with one input channel (LeNet-5's first layer), on CPU.
//
// For such a layer PyTorch's CPU backends compute A^T g as a general convolution (oneDNN) or a
// flipped convolution (NNPACK), both well above the forward's cost. Here, per image, g is copied once
// into a zero-padded plane, and each 16-column chunk of an output row accumulates
// `w[o, a, c] * g[o, i + ph - a, j + pw - c]` over all taps in registers, compiled per instruction
// set. Stride 1, dilation 1, one group. OpenMP (at::parallel_for) over images. The sum runs over
// taps in (o, a, c) order, so it differs from PyTorch's by rounding only.
#include "cpu/conv_input_grad.h"

#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu/target_clones.h"
#include "cpu/tensor_args.h"


namespace fastland {
namespace cpu {
namespace {

constexpr int64_t kChunk = 16;  // output columns accumulated in registers at once (measured: 16 beats 32)

// One image: g [O, Ho, Wo], w [O, kh, kw] -> out [H, W]. `pad` [O, Ho + 2 (kh - 1), Wp] holds g with
// kh - 1 zero rows above and below and kw - 1 zero columns left (Wp >= W + kChunk + pw + kw, a multiple of
// 16), so every tap reads a whole chunk of kChunk columns without bounds; each chunk of an output row
// accumulates in registers over all taps.
template <typename T>
FASTLAND_TARGET_CLONES void image(const T* g, const T* w, T* out, T* pad, int64_t O, int64_t Ho, int64_t Wo,
                                int64_t kh, int64_t kw, int64_t H, int64_t W, int64_t ph, int64_t pw, int64_t Wp) {
  const int64_t Hp = Ho + 2 * (kh - 1);
  std::fill(pad, pad + O * Hp * Wp, T(0));
  for (int64_t o = 0; o < O; ++o)
    for (int64_t r = 0; r < Ho; ++r)
      std::copy(g + (o * Ho + r) * Wo, g + (o * Ho + r + 1) * Wo, pad + (o * Hp + r + kh - 1) * Wp + kw - 1);
  for (int64_t i = 0; i < H; ++i) {
    for (int64_t j0 = 0; j0 < W; j0 += kChunk) {
      T acc[kChunk] = {};
      for (int64_t o = 0; o < O; ++o) {
        for (int64_t a = 0; a < kh; ++a) {
          // g row i + ph - a sits at padded row i + ph - a + kh - 1; column j + pw - c at j + pw - c + kw - 1.
          const T* row = pad + (o * Hp + i + ph - a + kh - 1) * Wp + j0 + pw + kw - 1;
          const T* wr = w + (o * kh + a) * kw;
          for (int64_t c = 0; c < kw; ++c) {
            const T wv = wr[c];
            const T* src = row - c;
#pragma omp simd
            for (int64_t l = 0; l < kChunk; ++l) acc[l] += wv * src[l];
          }
        }
      }
      const int64_t n = std::min<int64_t>(kChunk, W - j0);
      std::copy(acc, acc + n, out + i * W + j0);
    }
  }
}

}  // namespace

at::Tensor conv_input_grad_1ch(const at::Tensor& g, const at::Tensor& w, int64_t H, int64_t W, int64_t ph,
                               int64_t pw) {
  TORCH_CHECK(g.dim() == 4 && w.dim() == 4 && w.size(1) == 1 && g.size(1) == w.size(0),
              "conv_input_grad_1ch: expected g [B, O, Ho, Wo] and w [O, 1, kh, kw], got ", g.sizes(), " and ",
              w.sizes());
  check_input(g, "g");
  check_input(w, "w");
  check_same_dtype(w, g, "w", "g");
  const int64_t B = g.size(0), O = g.size(1), Ho = g.size(2), Wo = g.size(3), kh = w.size(2), kw = w.size(3);
  TORCH_CHECK(ph >= 0 && pw >= 0 && Ho == H + 2 * ph - kh + 1 && Wo == W + 2 * pw - kw + 1,
              "conv_input_grad_1ch: g's spatial size does not match H, W, the kernel and the padding");
  const at::Tensor gc = g.contiguous(), wc = w.contiguous();
  at::Tensor out = at::empty({B, 1, H, W}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv_input_grad_1ch", [&] {
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t Wp = ((W + kChunk + pw + kw + 15) / 16) * 16;  // every chunk's reads in the row
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> pad(O * (Ho + 2 * (kh - 1)) * Wp);
      for (int64_t b = lo; b < hi; ++b)
        image<scalar_t>(gp + b * O * Ho * Wo, wp, op + b * H * W, pad.data(), O, Ho, Wo, kh, kw, H, W, ph, pw, Wp);
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace fastland
