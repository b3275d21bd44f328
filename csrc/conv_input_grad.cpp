// The input gradient of a 2-D convolution with one input channel (LeNet-5's first layer), on CPU.
//
// For such a layer PyTorch's CPU backends compute A^T g as a general convolution (oneDNN) or a
// flipped convolution (NNPACK), both well above the forward's cost. Here each thread keeps one
// zero-padded plane per image's g (its border zeroed once, its interior copied per image), and each
// block of 4 output rows x 32 columns accumulates `w[o, a, c] * g[o, i + ph - a, j + pw - c]` over
// all taps in registers, compiled per instruction set: the block's sums are independent of one another,
// so the multiply-adds pipeline. Stride 1, dilation 1, one group. OpenMP (at::parallel_for) over
// images. The sum runs over taps in (o, a, c) order, so it differs from PyTorch's by rounding only.
#include "cpu/conv_input_grad.h"

#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu/padded_plane.h"
#include "cpu/target_clones.h"
#include "cpu/tensor_args.h"


namespace fastland {
namespace cpu {
namespace {

constexpr int64_t kRows = 4;   // output rows accumulated at once: independent sums hide the FMA latency
constexpr int64_t kCols = 32;  // output columns accumulated at once (two AVX-512 registers of float)

// The padded plane `pad` [O, Hp, Wp] holds g at rows kh - 1 ... and columns kw - 1 ..., zeros
// elsewhere: output row i reads padded rows i + ph - a + kh - 1, column j reads j + pw - c + kw - 1,
// for every block of kRows x kCols outputs without bounds (`plane_rows`, `plane_cols`).
inline int64_t plane_rows(int64_t H, int64_t Ho, int64_t kh, int64_t ph) {
  return std::max(Ho + 2 * (kh - 1), round_up(H, kRows) + ph + kh - 1);
}

inline int64_t plane_cols(int64_t W, int64_t Wo, int64_t kw, int64_t pw) {
  return round_up(std::max(Wo + 2 * (kw - 1), round_up(W, kCols) + pw + kw - 1), 16);
}

// One image: out [H, W] = sum over taps (o, a, c) of w[o, a, c] * g[o, i + ph - a, j + pw - c], read from the
// padded plane; each block of kRows x kCols outputs accumulates in registers over all taps (its kRows x
// kCols / lanes sums are independent, so the FMAs pipeline instead of waiting on one another).
template <typename T>
FASTLAND_TARGET_CLONES void image(const T* pad, const T* w, T* out, int64_t O, int64_t kh, int64_t kw, int64_t H,
                                int64_t W, int64_t ph, int64_t pw, int64_t Hp, int64_t Wp) {
  for (int64_t i0 = 0; i0 < H; i0 += kRows) {
    for (int64_t j0 = 0; j0 < W; j0 += kCols) {
      T acc[kRows][kCols] = {};
      for (int64_t o = 0; o < O; ++o) {
        for (int64_t a = 0; a < kh; ++a) {
          const T* base = pad + (o * Hp + i0 + ph - a + kh - 1) * Wp + j0 + pw + kw - 1;
          const T* wr = w + (o * kh + a) * kw;
          for (int64_t c = 0; c < kw; ++c) accumulate_block(acc, wr[c], base - c, Wp);
        }
      }
      store_block(acc, out + i0 * W + j0, W, std::min<int64_t>(kRows, H - i0), std::min<int64_t>(kCols, W - j0));
    }
  }
}

}  // namespace

at::Tensor conv_input_grad_1ch(const at::Tensor& g, const at::Tensor& w, int64_t H, int64_t W, int64_t ph,
                               int64_t pw) {
  TORCH_CHECK(g.dim() == 4 && w.dim() == 4 && w.size(1) == 1 && g.size(1) == w.size(0),
              "conv_input_grad_1ch: expected g [B, O, Ho, Wo] and w [O, 1, kh, kw], got ", g.sizes(), " and ",
              w.sizes());
  check_pair(w, g, "w", "g");
  const int64_t B = g.size(0), O = g.size(1), Ho = g.size(2), Wo = g.size(3), kh = w.size(2), kw = w.size(3);
  TORCH_CHECK(ph >= 0 && pw >= 0 && Ho == H + 2 * ph - kh + 1 && Wo == W + 2 * pw - kw + 1,
              "conv_input_grad_1ch: g's spatial size does not match H, W, the kernel and the padding");
  const at::Tensor gc = g.contiguous(), wc = w.contiguous();
  at::Tensor out = at::empty({B, 1, H, W}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv_input_grad_1ch", [&] {
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t Hp = plane_rows(H, Ho, kh, ph), Wp = plane_cols(W, Wo, kw, pw);
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> pad(O * Hp * Wp, scalar_t(0));
      for (int64_t b = lo; b < hi; ++b) {
        for (int64_t o = 0; o < O; ++o)
          copy_into_plane(gp + (b * O + o) * Ho * Wo, Ho, Wo, pad.data() + o * Hp * Wp, Wp, kh - 1, kw - 1);
        image<scalar_t>(pad.data(), wp, op + b * H * W, O, kh, kw, H, W, ph, pw, Hp, Wp);
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace fastland
