// wisparse_cpu::sparse_gemv: activation-sparse GEMV for decode-sized calls on CPU.
//
// out[r, :] = sum_{i kept for row r} x[r, i] * WT[i, :] + bias,   kept iff |x[r, i]| > t[i] (fp32).
//
// WT is the input-major weight [in, out] (W.t() of a weight that attach() re-laid out), so a
// pruned channel skips one contiguous row of WT: the kernel reads only the kept rows, which is
// where the speed-up of a memory-bound GEMV comes from. The union of the rows' masks decides which
// WT rows are loaded; each token row applies its own mask through a zero coefficient.
// Kept rows are split between threads; each thread streams whole rows, four at a time, into a
// full-length fp32 partial output, then partials are summed.
//
// bf16 weights are widened without a shuffle: a 256-bit load of 16 bf16 values gives the 8 even
// ones as fp32 by a 32-bit left shift and the 8 odd ones by masking the high halves. So the
// partial output holds each 16-column block as [8 even columns, 8 odd columns] and is put back in
// order once at the end: one load, one shift, one and, two FMAs per 16 weights (no port-5 widening).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 8;

inline float load_f32(const float* p, int64_t j) { return p[j]; }

inline float load_f32(const uint16_t* p, int64_t j) {
  uint32_t bits = static_cast<uint32_t>(p[j]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // bf16 -> fp32: widen, shift into the high half
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

// acc[0:len] += c0*w0 + c1*w1 + c2*w2 + c3*w3 (AVX2 FMA where built for it, scalar tail).
template <typename W>
inline void axpy4(float* __restrict acc, const W* __restrict w0, const W* __restrict w1,
                  const W* __restrict w2, const W* __restrict w3, float c0, float c1, float c2,
                  float c3, int64_t len) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 v0 = _mm256_set1_ps(c0), v1 = _mm256_set1_ps(c1), v2 = _mm256_set1_ps(c2), v3 = _mm256_set1_ps(c3);
  for (; j + 16 <= len; j += 16) {
    __m256 a = _mm256_loadu_ps(acc + j), b = _mm256_loadu_ps(acc + j + 8);
    a = _mm256_fmadd_ps(v0, load8(w0 + j), a);
    b = _mm256_fmadd_ps(v0, load8(w0 + j + 8), b);
    a = _mm256_fmadd_ps(v1, load8(w1 + j), a);
    b = _mm256_fmadd_ps(v1, load8(w1 + j + 8), b);
    a = _mm256_fmadd_ps(v2, load8(w2 + j), a);
    b = _mm256_fmadd_ps(v2, load8(w2 + j + 8), b);
    a = _mm256_fmadd_ps(v3, load8(w3 + j), a);
    b = _mm256_fmadd_ps(v3, load8(w3 + j + 8), b);
    _mm256_storeu_ps(acc + j, a);
    _mm256_storeu_ps(acc + j + 8, b);
  }
#endif
  for (; j < len; ++j) {
    acc[j] += c0 * load_f32(w0, j) + c1 * load_f32(w1, j) + c2 * load_f32(w2, j) + c3 * load_f32(w3, j);
  }
}

template <typename W>
inline void axpy1(float* __restrict acc, const W* __restrict w0, float c0, int64_t len) {
  for (int64_t j = 0; j < len; ++j) acc[j] += c0 * load_f32(w0, j);
}

#if defined(__AVX2__) && defined(__FMA__)
// bf16 rows into a partial whose full 16-column blocks are stored [evens, odds] (see the top).
inline void split_bf16(const uint16_t* p, __m256& even, __m256& odd) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// acc[j:j+16] (stored [evens, odds]) += v * w[j:j+16]
inline void fma_split(const uint16_t* w, __m256 v, __m256& a, __m256& b) {
  __m256 e, o;
  split_bf16(w, e, o);
  a = _mm256_fmadd_ps(v, e, a);
  b = _mm256_fmadd_ps(v, o, b);
}

// The bf16 overloads of axpy4/axpy1 (the templates above serve fp32): split layout, natural tail.
inline void axpy4(float* __restrict acc, const uint16_t* __restrict w0, const uint16_t* __restrict w1,
                  const uint16_t* __restrict w2, const uint16_t* __restrict w3, float c0, float c1, float c2,
                  float c3, int64_t len) {
  const __m256 v0 = _mm256_set1_ps(c0), v1 = _mm256_set1_ps(c1), v2 = _mm256_set1_ps(c2), v3 = _mm256_set1_ps(c3);
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    __m256 a = _mm256_loadu_ps(acc + j), b = _mm256_loadu_ps(acc + j + 8);
    fma_split(w0 + j, v0, a, b);
    fma_split(w1 + j, v1, a, b);
    fma_split(w2 + j, v2, a, b);
    fma_split(w3 + j, v3, a, b);
    _mm256_storeu_ps(acc + j, a);
    _mm256_storeu_ps(acc + j + 8, b);
  }
  for (; j < len; ++j) {
    acc[j] += c0 * load_f32(w0, j) + c1 * load_f32(w1, j) + c2 * load_f32(w2, j) + c3 * load_f32(w3, j);
  }
}

inline void axpy1(float* __restrict acc, const uint16_t* __restrict w0, float c0, int64_t len) {
  const __m256 v0 = _mm256_set1_ps(c0);
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    __m256 a = _mm256_loadu_ps(acc + j), b = _mm256_loadu_ps(acc + j + 8);
    fma_split(w0 + j, v0, a, b);
    _mm256_storeu_ps(acc + j, a);
    _mm256_storeu_ps(acc + j + 8, b);
  }
  for (; j < len; ++j) acc[j] += c0 * load_f32(w0, j);
}

constexpr bool kSplitBf16 = true;
#else
constexpr bool kSplitBf16 = false;
#endif

// Streams kept channels [begin, end) into partial [m, n]: whole rows, so each WT row is read
// once, sequentially (prefetcher-friendly; tiling the columns measured slower).
template <typename W>
void stream_rows(const W* wt, int64_t n, const int64_t* kept, const float* coef, int64_t m,
                 int64_t begin, int64_t end, float* partial) {
  int64_t q = begin;
  for (; q + 4 <= end; q += 4) {
    const W* w0 = wt + kept[q] * n;
    const W* w1 = wt + kept[q + 1] * n;
    const W* w2 = wt + kept[q + 2] * n;
    const W* w3 = wt + kept[q + 3] * n;
    for (int64_t r = 0; r < m; ++r) {
      axpy4(partial + r * n, w0, w1, w2, w3, coef[q * m + r], coef[(q + 1) * m + r], coef[(q + 2) * m + r],
            coef[(q + 3) * m + r], n);
    }
  }
  for (; q < end; ++q) {
    const W* w0 = wt + kept[q] * n;
    for (int64_t r = 0; r < m; ++r) axpy1(partial + r * n, w0, coef[q * m + r], n);
  }
}

at::Tensor sparse_gemv_cpu(const at::Tensor& x, const at::Tensor& wt, const c10::optional<at::Tensor>& bias,
                           const at::Tensor& thresholds) {
  TORCH_CHECK(x.device().is_cpu() && wt.device().is_cpu(), "wisparse_cpu::sparse_gemv: CPU tensors only");
  TORCH_CHECK(x.dim() == 2, "wisparse_cpu::sparse_gemv: x must be 2-D [rows, in], got ", x.dim(), "-D");
  TORCH_CHECK(wt.dim() == 2 && wt.is_contiguous(),
              "wisparse_cpu::sparse_gemv: wt must be the contiguous input-major weight [in, out] (W.t())");
  TORCH_CHECK(x.scalar_type() == wt.scalar_type(), "wisparse_cpu::sparse_gemv: x and wt dtypes differ");
  TORCH_CHECK(wt.scalar_type() == at::kFloat || wt.scalar_type() == at::kBFloat16,
              "wisparse_cpu::sparse_gemv: float32 and bfloat16 only, got ", wt.scalar_type());
  const int64_t m = x.size(0), k = wt.size(0), n = wt.size(1);
  TORCH_CHECK(x.size(1) == k, "wisparse_cpu::sparse_gemv: x has ", x.size(1), " channels, wt has ", k);
  TORCH_CHECK(m <= kMaxRows, "wisparse_cpu::sparse_gemv: at most ", kMaxRows, " rows, got ", m);
  TORCH_CHECK(thresholds.numel() == k, "wisparse_cpu::sparse_gemv: thresholds must have ", k, " entries");

  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor tf = thresholds.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  const float* tp = tf.data_ptr<float>();

  // Scan: kept channels (union over rows) and per-row coefficients (0 where that row prunes).
  std::vector<int64_t> kept;
  std::vector<float> coef;
  kept.reserve(k);
  coef.reserve(k * m);
  for (int64_t i = 0; i < k; ++i) {
    bool any = false;
    for (int64_t r = 0; r < m; ++r) any |= std::fabs(xp[r * k + i]) > tp[i];
    if (!any) continue;
    kept.push_back(i);
    for (int64_t r = 0; r < m; ++r) {
      const float v = xp[r * k + i];
      coef.push_back(std::fabs(v) > tp[i] ? v : 0.0f);
    }
  }
  const int64_t nkept = static_cast<int64_t>(kept.size());

  // One fp32 partial per chunk of kept rows; chunks = threads (each chunk at least 16 rows).
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nkept / 16));
  at::Tensor partials = at::zeros({chunks, m, n}, xf.options());
  float* pp = partials.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = nkept * c / chunks, end = nkept * (c + 1) / chunks;
      float* partial = pp + c * m * n;
      if (wt.scalar_type() == at::kFloat) {
        stream_rows(wt.data_ptr<float>(), n, kept.data(), coef.data(), m, begin, end, partial);
      } else {
        stream_rows(reinterpret_cast<const uint16_t*>(wt.data_ptr<at::BFloat16>()), n, kept.data(), coef.data(),
                    m, begin, end, partial);
      }
    }
  });

  at::Tensor out = partials.select(0, 0);
  if (chunks > 1) out = partials.sum(0);
  const int64_t blocked = n / 16 * 16;
  if (kSplitBf16 && wt.scalar_type() == at::kBFloat16 && blocked > 0) {  // [evens, odds] -> natural order
    at::Tensor ordered = out.narrow(1, 0, blocked).reshape({m, blocked / 16, 2, 8}).transpose(2, 3).reshape({m, blocked});
    out = blocked == n ? ordered : at::cat({ordered, out.narrow(1, blocked, n - blocked)}, 1);
  }
  if (bias.has_value() && bias->defined()) out = out + bias->to(at::kFloat);
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(wisparse_cpu, m) {
  m.def("sparse_gemv(Tensor x, Tensor wt, Tensor? bias, Tensor thresholds) -> Tensor");
}

TORCH_LIBRARY_IMPL(wisparse_cpu, CPU, m) { m.impl("sparse_gemv", &sparse_gemv_cpu); }
