// The forward of a 2-D convolution with one input channel (LeNet-5's first layer), on CPU.
//
// oneDNN's forward for one input channel runs at a fraction of the machine's multiply-add rate.
// Here each thread keeps one zero-padded plane (csrc/cpu/padded_plane.h) into which each image is
// copied once; per output channel, each block of 4 output rows x 32 columns starts from the bias and
// accumulates `w[o, a, c] * x[i + a - ph, j + c - pw]` over the taps in registers (independent
// sums, so the multiply-adds pipeline), compiled per instruction set. Stride 1, dilation 1, one group.
// OpenMP (at::parallel_for) over images. The sum runs over taps in (a, c) order: it differs from
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

constexpr int64_t kRows = 4;   // output rows of a block
constexpr int64_t kCols = 32;  // output columns of a block (two AVX-512 registers of float)

// One image, one output channel: out [Ho, Wo] from the padded plane (rows of Wp elements) and w [kh, kw].
template <typename T>
FASTLAND_TARGET_CLONES void channel(const T* plane, const T* w, T bias, T* out, int64_t kh, int64_t kw,
                                  int64_t Ho, int64_t Wo, int64_t Wp) {
  for (int64_t i0 = 0; i0 < Ho; i0 += kRows) {
    for (int64_t j0 = 0; j0 < Wo; j0 += kCols) {
      T acc[kRows][kCols];
      for (int64_t r = 0; r < kRows; ++r) std::fill(acc[r], acc[r] + kCols, bias);
      for (int64_t a = 0; a < kh; ++a) {
        for (int64_t c = 0; c < kw; ++c) accumulate_block(acc, w[a * kw + c], plane + (i0 + a) * Wp + j0 + c, Wp);
      }
      store_block(acc, out + i0 * Wo + j0, Wo, std::min<int64_t>(kRows, Ho - i0), std::min<int64_t>(kCols, Wo - j0));
    }
  }
}

}  // namespace

at::Tensor conv_forward_1ch(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                            int64_t ph, int64_t pw) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) == 1 && w.dim() == 4 && w.size(1) == 1,
              "conv_forward_1ch: expected x [B, 1, H, W] and w [O, 1, kh, kw], got ", x.sizes(), " and ", w.sizes());
  check_pair(w, x, "w", "x");
  const bool has_bias = b.has_value() && b->defined();
  if (has_bias) {
    check_same_dtype(*b, x, "b", "x");
    TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0), "conv_forward_1ch: expected b [", w.size(0), "], got ",
                b->sizes());
  }
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3), O = w.size(0), kh = w.size(2), kw = w.size(3);
  const int64_t Ho = H + 2 * ph - kh + 1, Wo = W + 2 * pw - kw + 1;
  TORCH_CHECK(ph >= 0 && pw >= 0 && Ho >= 1 && Wo >= 1,
              "conv_forward_1ch: expected a non-empty output, got input ", x.sizes(), ", kernel ", w.sizes(),
              ", padding (", ph, ", ", pw, ")");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const at::Tensor bc = has_bias ? b->contiguous() : at::zeros({O}, x.options());
  at::Tensor out = at::empty({B, O, Ho, Wo}, x.options());
  // the plane: x at (ph, pw); every block's reads (rows up to round_up(Ho) + kh - 1, columns up to
  // round_up(Wo) + kw - 1) inside it
  const int64_t Hp = round_up(Ho, kRows) + kh - 1, Wp = round_up(round_up(Wo, kCols) + kw - 1, 16);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_forward_1ch", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    const scalar_t* bp = bc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> plane(Hp * Wp, scalar_t(0));
      for (int64_t n = lo; n < hi; ++n) {
        copy_into_plane(xp + n * H * W, H, W, plane.data(), Wp, ph, pw);
        for (int64_t o = 0; o < O; ++o)
          channel<scalar_t>(plane.data(), wp + o * kh * kw, bp[o], op + (n * O + o) * Ho * Wo, kh, kw, Ho, Wo, Wp);
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace fastland
