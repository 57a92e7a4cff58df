// wisparse_cpu::sparse_gemv: activation-sparse GEMV for decode-sized calls on CPU.
//
// out[r, :] = sum_{i kept for row r} x[r, i] * WT[i, :] + bias,   kept iff |x[r, i]| > t[i] (fp32) or x[r, i] is NaN
// (wisparse_compile/mask.py: NaN reaches the output as in the dense op).
//
// WT is the input-major weight [in, out] (W.t() of a weight that attach() re-laid out), so a
// pruned channel skips one contiguous row of WT: the kernel reads only the kept rows, which is
// where the speed-up of a memory-bound GEMV comes from. The union of the rows' masks decides which
// WT rows are loaded; each token row applies its own mask through a zero coefficient.
// Kept rows are streamed four at a time into a full-length fp32 partial output. For bf16, the rows
// a few groups ahead (about kPrefetchBytes) are software-prefetched into L2: kept rows are
// scattered, and each one is too short a stream for the hardware prefetcher to ramp up on (fp32
// rows are twice as long, and there the prefetches measured slower).
// Threads split the kept rows, each into its own partial, where each thread gets at least
// WISPARSE_CPU_BYTES_PER_THREAD bytes of weights (default 32 KiB): below that, a thread's start and
// the partials' sum cost more than the stream it takes over. The extension is built with -fopenmp:
// without it at::parallel_for compiles to a plain loop (ATen's OpenMP backend is header code) and
// every "split" call ran its chunks one after another on one thread.
// Scratch (kept list, coefficients, partials) lives in thread-local buffers that grow once, and one
// epilogue pass sums the partials, restores column order, adds the bias and casts, so a call
// allocates only its output.
//
// bf16 weights are widened without a shuffle: a 256-bit load of 16 bf16 values gives the 8 even
// ones as fp32 by a 32-bit left shift and the 8 odd ones by masking the high halves. So the
// partial output holds each 16-column block as [8 even columns, 8 odd columns] and the epilogue puts
// it back in order: one load, one shift, one and, two FMAs per 16 weights (no port-5 widening).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <c10/util/BFloat16.h>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kPrefetchBytes = 32 * 1024;  // how far ahead kept rows are prefetched (measured: 8-128 KiB)

int64_t bytes_per_thread() {
  static const int64_t value = [] {
    const char* env = std::getenv("WISPARSE_CPU_BYTES_PER_THREAD");
    const long long v = env ? std::atoll(env) : 0;
    return v > 0 ? static_cast<int64_t>(v) : static_cast<int64_t>(32) << 10;
  }();
  return value;
}

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
// Prefetches nothing: only the AVX2 bf16 overload below prefetches (``ahead``); fp32 rows measured
// slower with it, and a build without AVX2 has no fast path to feed.
template <typename W>
inline void axpy4(float* __restrict acc, const W* __restrict w0, const W* __restrict w1,
                  const W* __restrict w2, const W* __restrict w3, float c0, float c1, float c2,
                  float c3, int64_t len, const W* const* /*ahead*/) {
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

inline void prefetch_line(const uint16_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1); }

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
                  float c3, int64_t len, const uint16_t* const* ahead) {
  const __m256 v0 = _mm256_set1_ps(c0), v1 = _mm256_set1_ps(c1), v2 = _mm256_set1_ps(c2), v3 = _mm256_set1_ps(c3);
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    if (ahead && j % 32 == 0) {  // one 64-byte line per row every 32 columns
      for (int t = 0; t < 4; ++t) prefetch_line(ahead[t] + j);
    }
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
// once, sequentially (tiling the columns measured slower), while the group `ahead` rows later is
// prefetched line by line alongside.
template <typename W>
void stream_rows(const W* wt, int64_t n, const int64_t* kept, const float* coef, int64_t m,
                 int64_t begin, int64_t end, float* partial) {
  const int64_t ahead_rows = 4 * std::max<int64_t>(1, kPrefetchBytes / (4 * n * static_cast<int64_t>(sizeof(W))));
  int64_t q = begin;
  for (; q + 4 <= end; q += 4) {
    const W* w0 = wt + kept[q] * n;
    const W* w1 = wt + kept[q + 1] * n;
    const W* w2 = wt + kept[q + 2] * n;
    const W* w3 = wt + kept[q + 3] * n;
    const W* ahead[4];
    const bool prefetch = kSplitBf16 && sizeof(W) == 2 && q + ahead_rows + 4 <= end;  // see axpy4
    if (prefetch) {
      for (int t = 0; t < 4; ++t) ahead[t] = wt + kept[q + ahead_rows + t] * n;
    }
    for (int64_t r = 0; r < m; ++r) {
      axpy4(partial + r * n, w0, w1, w2, w3, coef[q * m + r], coef[(q + 1) * m + r], coef[(q + 2) * m + r],
            coef[(q + 3) * m + r], n, prefetch && r == 0 ? ahead : nullptr);
    }
  }
  for (; q < end; ++q) {
    const W* w0 = wt + kept[q] * n;
    for (int64_t r = 0; r < m; ++r) axpy1(partial + r * n, w0, coef[q * m + r], n);
  }
}

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return load_f32(&v, 0); }
// The mask (wisparse_compile/mask.py): kept iff |v| > t, or v is NaN.
inline bool channel_kept(float v, float t) { return std::fabs(v) > t || std::isnan(v); }
inline void from_f32(float v, float* out) { *out = v; }
inline void from_f32(float v, uint16_t* out) { *out = c10::BFloat16(v).x; }  // round to nearest even

#if defined(__AVX512F__)
inline __m512 load16_f32(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16_f32(const uint16_t* p) {  // bf16 -> fp32
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The one-row scan (decode at batch 1), 16 channels per step: the kept lanes (|x| > t ordered, or x
// NaN: channel_kept) as a mask, their indices and values compressed in registers and stored whole
// (the buffers have 16 spare entries; a compress straight to memory is microcoded on AMD Zen 4).
// Branch-free: at 50% sparsity the scalar loop mispredicts about every other channel, which cost
// ~0.5 ms of a 30-layer SmolLM2 step. Returns the kept count; channels [i_end, k) are left to the caller.
template <typename X>
int64_t gather_kept_row16(const X* xp, const float* tp, int64_t k, int64_t* kept, float* coef, int64_t& i_end) {
  int64_t nkept = 0, i = 0;
  const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  for (; i + 16 <= k; i += 16) {
    const __m512 v = load16_f32(xp + i);
    const __mmask16 keep = tp == nullptr ? static_cast<__mmask16>(0xFFFF)
        : static_cast<__mmask16>(_mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_loadu_ps(tp + i), _CMP_GT_OQ) |
                                 _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q));
    _mm512_storeu_ps(coef + nkept, _mm512_maskz_compress_ps(keep, v));
    const __m512i lo = _mm512_add_epi64(_mm512_set1_epi64(i), iota);
    const __m512i hi = _mm512_add_epi64(lo, _mm512_set1_epi64(8));
    const int nlo = __builtin_popcount(keep & 0xFF);
    _mm512_storeu_si512(kept + nkept, _mm512_maskz_compress_epi64(static_cast<__mmask8>(keep & 0xFF), lo));
    _mm512_storeu_si512(kept + nkept + nlo, _mm512_maskz_compress_epi64(static_cast<__mmask8>(keep >> 8), hi));
    nkept += nlo + __builtin_popcount(keep >> 8);
  }
  i_end = i;
  return nkept;
}
#endif

// Scan: the kept channels (union over the rows) and per-row coefficients (0 where that row prunes);
// tp == nullptr keeps every channel (a dense call). Returns how many channels are kept.
template <typename X>
int64_t gather_kept(const X* xp, const float* tp, int64_t m, int64_t k, std::vector<int64_t>& kept,
                    std::vector<float>& coef) {
  if (static_cast<int64_t>(kept.size()) < k + 16) kept.resize(k + 16);  // + 16: gather_kept_row16's whole stores
  if (static_cast<int64_t>(coef.size()) < k * m + 16) coef.resize(k * m + 16);
  int64_t nkept = 0, start = 0;
#if defined(__AVX512F__)
  if (m == 1) nkept = gather_kept_row16(xp, tp, k, kept.data(), coef.data(), start);
#endif
  for (int64_t i = start; i < k; ++i) {
    bool any = tp == nullptr;
    for (int64_t r = 0; r < m && !any; ++r) any = channel_kept(to_f32(xp[r * k + i]), tp[i]);
    if (!any) continue;
    for (int64_t r = 0; r < m; ++r) {
      const float v = to_f32(xp[r * k + i]);
      coef[nkept * m + r] = (tp == nullptr || channel_kept(v, tp[i])) ? v : 0.0f;
    }
    kept[nkept++] = i;
  }
  return nkept;
}

// ---- Segments: the work split of every call ----
// A call covers one weight, or several sibling weights that read the same x (q/k/v, gate/up: one
// call instead of three, wisparse::sparse_linear_group). A segment is one weight's share: its
// own kept channels (its own thresholds) and how many bytes one of its kept rows streams.
struct Segment {
  const float* thresholds = nullptr;  // [k]; nullptr keeps every channel (a dense call)
  int64_t n = 0;                      // outputs
  int64_t row_bytes = 0;              // weight bytes streamed per kept row
  int64_t nkept = 0;
  std::vector<int64_t> kept;
  std::vector<float> coef;
};

// A range of one segment's kept rows run by one thread into its own fp32 partial [m, n].
struct Piece {
  int64_t segment, begin, end, partial;
};

// Scans every segment, cuts all their kept rows by bytes into one run of pieces per thread (at most
// one piece per segment per thread; threads only where each gets at least bytes_per_thread() and 16
// rows), runs stream(segment, begin, end, partial) for each piece, then finish(segment, partials,
// count) with that segment's partials. Scratch lives in thread-local buffers that grow once.
template <typename X, typename Stream, typename Finish>
void run_segments(const X* xp, int64_t m, int64_t k, Segment* segments, int64_t count, const Stream& stream,
                  const Finish& finish) {
  thread_local std::vector<float> scratch;
  thread_local std::vector<Piece> pieces;
  thread_local std::vector<const float*> partials;
  int64_t total_bytes = 0, total_rows = 0;
  for (int64_t si = 0; si < count; ++si) {
    Segment& seg = segments[si];
    seg.nkept = gather_kept(xp, seg.thresholds, m, k, seg.kept, seg.coef);
    total_bytes += seg.nkept * seg.row_bytes;
    total_rows += seg.nkept;
  }
  const int64_t threads = std::max<int64_t>(
      1, std::min({static_cast<int64_t>(at::get_num_threads()), total_rows / 16, total_bytes / bytes_per_thread()}));
  // Thread t takes the bytes [total * t / threads, total * (t + 1) / threads) of the segments laid
  // end to end; a boundary inside a segment rounds to the nearest row, the same for both neighbours.
  pieces.clear();
  std::vector<int64_t> first_piece(threads + 1, 0);
  int64_t floats = 0;
  for (int64_t t = 0; t < threads; ++t) {
    first_piece[t] = static_cast<int64_t>(pieces.size());
    const int64_t lo = total_bytes * t / threads, hi = total_bytes * (t + 1) / threads;
    int64_t start = 0;
    for (int64_t si = 0; si < count; ++si) {
      const Segment& seg = segments[si];
      const int64_t bytes = seg.nkept * seg.row_bytes;
      auto row_at = [&](int64_t at) {
        const int64_t into = std::clamp<int64_t>(at - start, 0, bytes);
        return seg.row_bytes > 0 ? std::min(seg.nkept, (into + seg.row_bytes / 2) / seg.row_bytes) : 0;
      };
      const int64_t begin = t == 0 ? 0 : row_at(lo), end = t + 1 == threads ? seg.nkept : row_at(hi);
      if (begin < end) {
        pieces.push_back({si, begin, end, floats});
        floats += m * seg.n;
      }
      start += bytes;
    }
  }
  first_piece[threads] = static_cast<int64_t>(pieces.size());
  if (static_cast<int64_t>(scratch.size()) < floats) scratch.resize(floats);
  float* base = scratch.data();
  const Piece* pp = pieces.data();
  auto run_thread = [&](int64_t t) {
    for (int64_t i = first_piece[t]; i < first_piece[t + 1]; ++i) {
      const Piece& piece = pp[i];
      float* partial = base + piece.partial;
      std::fill(partial, partial + m * segments[piece.segment].n, 0.0f);
      stream(piece.segment, piece.begin, piece.end, partial);
    }
  };
  if (threads == 1) {
    run_thread(0);
  } else {
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) run_thread(t);
    });
  }
  for (int64_t si = 0; si < count; ++si) {
    partials.clear();
    for (const Piece& piece : pieces) {
      if (piece.segment == si) partials.push_back(base + piece.partial);
    }
    finish(si, partials.data(), static_cast<int64_t>(partials.size()));
  }
}

// ``count`` segments for a call, from a thread-local pool whose scan buffers are reused across calls.
Segment* segments_for(int64_t count) {
  thread_local std::vector<Segment> pool;
  if (static_cast<int64_t>(pool.size()) < count) pool.resize(count);
  for (int64_t i = 0; i < count; ++i) pool[i].thresholds = nullptr;
  return pool.data();
}

// W: float or uint16_t (bf16 bits) for x, WT and the output alike.
template <typename W>
void sparse_gemv_impl(const W* xp, const W* wt, const float* bias, const float* tp, int64_t m, int64_t k,
                      int64_t n, W* out) {
  Segment* seg = segments_for(1);
  seg->thresholds = tp;
  seg->n = n;
  seg->row_bytes = n * static_cast<int64_t>(sizeof(W));
  // Epilogue: sum partials, [evens, odds] blocks back to natural order (bf16), bias, cast.
  const bool split = kSplitBf16 && sizeof(W) == 2;
  const int64_t blocked = split ? n / 16 * 16 : 0;
  run_segments(
      xp, m, k, seg, 1,
      [&](int64_t, int64_t begin, int64_t end, float* partial) {
        stream_rows(wt, n, seg->kept.data(), seg->coef.data(), m, begin, end, partial);
      },
      [&](int64_t, const float* const* partials, int64_t count) {
        for (int64_t r = 0; r < m; ++r) {
          for (int64_t j = 0; j < n; ++j) {
            const int64_t src = r * n + (j < blocked ? (j & ~int64_t{15}) + (j & 1) * 8 + ((j & 15) >> 1) : j);
            float v = bias ? bias[j] : 0.0f;
            for (int64_t c = 0; c < count; ++c) v += partials[c][src];
            from_f32(v, out + r * n + j);
          }
        }
      });
}

// ---- int8 weights (wisparse_cpu::sparse_gemv_int8) ----
// out[r, :] = (sum_{i kept for row r} x[r, i] * QT[i, :]) * scale + bias, QT int8 [in, out] (input-major),
// scale fp32 [out] (symmetric per output channel). Same scan, chunking and partials as above; rows go
// eight at a time, 64 columns per step (one fp32 partial load/store per eight int8 rows, so the
// partial's traffic stays below the weight stream), int8 widened to fp32 in registers (AVX-512: 16
// lanes per vpmovsxbd + vcvtdq2ps; AVX2: 8), and the scale is applied once per column in the
// epilogue. The rows about kInt8PrefetchBytes later are prefetched a line at a time alongside (a
// kept int8 row of a small model is a few cache lines: too short for the hardware prefetcher).
constexpr int64_t kInt8PrefetchBytes = 16 * 1024;

#if defined(__AVX512F__)
inline __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#elif defined(__AVX2__) && defined(__FMA__)
inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#endif

// Measured on a 2-core AVX-512 EPYC, one thread, against a read loop in the same run (kernel_bench
// --cpu): eight-row groups 83-99% of the read loop on the large shapes, four-row groups 65-89%; the
// prefetch adds 5-10 points on rows of 576-4096 columns and costs a few on the 49152-wide head.
constexpr int kInt8Group = 8;

// Into L2, not L1: the next group's rows (12 KiB for 1536-column rows) beside the current group and
// the partial overflowed the 32 KiB L1. One thread, weights from DRAM: T1 against T0 45-51 vs 72-76
// us on 1536x576 at 50%, 19.5-20 vs 25-29 us on 576x576, 1.59-1.66 vs 1.93-2.02 ms on the 576x49152 head.
inline void prefetch_line_i8(const int8_t* p) {
#if defined(__AVX2__) || defined(__AVX512F__)
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
#else
  (void)p;
#endif
}

// acc[0:len] += sum_t c[t] * w[t][0:len] for R rows (R = 1, 4 or 8); ``ahead`` (or nullptr): R rows
// to prefetch alongside, one 64-byte line of each per 64 columns.
template <int R>
inline void axpy_int8(float* __restrict acc, const int8_t* const* w, const float* c, int64_t len,
                      const int8_t* const* ahead) {
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 v[R];
  for (int t = 0; t < R; ++t) v[t] = _mm512_set1_ps(c[t]);
  for (; j + 64 <= len; j += 64) {
    if (ahead) {
      for (int t = 0; t < R; ++t) prefetch_line_i8(ahead[t] + j);
    }
    __m512 a0 = _mm512_loadu_ps(acc + j), a1 = _mm512_loadu_ps(acc + j + 16);
    __m512 a2 = _mm512_loadu_ps(acc + j + 32), a3 = _mm512_loadu_ps(acc + j + 48);
    for (int t = 0; t < R; ++t) {
      a0 = _mm512_fmadd_ps(v[t], widen16(w[t] + j), a0);
      a1 = _mm512_fmadd_ps(v[t], widen16(w[t] + j + 16), a1);
      a2 = _mm512_fmadd_ps(v[t], widen16(w[t] + j + 32), a2);
      a3 = _mm512_fmadd_ps(v[t], widen16(w[t] + j + 48), a3);
    }
    _mm512_storeu_ps(acc + j, a0);
    _mm512_storeu_ps(acc + j + 16, a1);
    _mm512_storeu_ps(acc + j + 32, a2);
    _mm512_storeu_ps(acc + j + 48, a3);
  }
  for (; j + 16 <= len; j += 16) {
    __m512 a = _mm512_loadu_ps(acc + j);
    for (int t = 0; t < R; ++t) a = _mm512_fmadd_ps(v[t], widen16(w[t] + j), a);
    _mm512_storeu_ps(acc + j, a);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 v[R];
  for (int t = 0; t < R; ++t) v[t] = _mm256_set1_ps(c[t]);
  for (; j + 32 <= len; j += 32) {
    if (ahead && j % 64 == 0) {
      for (int t = 0; t < R; ++t) prefetch_line_i8(ahead[t] + j);
    }
    __m256 a0 = _mm256_loadu_ps(acc + j), a1 = _mm256_loadu_ps(acc + j + 8);
    __m256 a2 = _mm256_loadu_ps(acc + j + 16), a3 = _mm256_loadu_ps(acc + j + 24);
    for (int t = 0; t < R; ++t) {
      a0 = _mm256_fmadd_ps(v[t], widen8(w[t] + j), a0);
      a1 = _mm256_fmadd_ps(v[t], widen8(w[t] + j + 8), a1);
      a2 = _mm256_fmadd_ps(v[t], widen8(w[t] + j + 16), a2);
      a3 = _mm256_fmadd_ps(v[t], widen8(w[t] + j + 24), a3);
    }
    _mm256_storeu_ps(acc + j, a0);
    _mm256_storeu_ps(acc + j + 8, a1);
    _mm256_storeu_ps(acc + j + 16, a2);
    _mm256_storeu_ps(acc + j + 24, a3);
  }
#endif
  for (; j < len; ++j) {
    float s = 0.0f;
    for (int t = 0; t < R; ++t) s += c[t] * static_cast<float>(w[t][j]);
    acc[j] += s;
  }
}

// Kept channels [begin, end) of QT into partial [m, n]: groups of eight rows (then 4, then 1), the
// rows about kInt8PrefetchBytes later prefetched alongside, a line per row per 64 columns.
void stream_rows_int8(const int8_t* qt, int64_t n, const int64_t* kept, const float* coef, int64_t m,
                      int64_t begin, int64_t end, float* partial) {
  constexpr int G = kInt8Group;
  const int64_t ahead = std::max<int64_t>(G, kInt8PrefetchBytes / std::max<int64_t>(n, 1)) / G * G;
  const int8_t* w[8];
  const int8_t* pre[8];
  float c[8];
  int64_t q = begin;
  for (; q + G <= end; q += G) {
    for (int t = 0; t < G; ++t) w[t] = qt + kept[q + t] * n;
    const bool prefetch = q + ahead + G <= end;
    if (prefetch) {
      for (int t = 0; t < G; ++t) pre[t] = qt + kept[q + ahead + t] * n;
    }
    for (int64_t r = 0; r < m; ++r) {
      for (int t = 0; t < G; ++t) c[t] = coef[(q + t) * m + r];
      axpy_int8<G>(partial + r * n, w, c, n, prefetch && r == 0 ? pre : nullptr);
    }
  }
  for (; q + 4 <= end; q += 4) {
    for (int t = 0; t < 4; ++t) w[t] = qt + kept[q + t] * n;
    for (int64_t r = 0; r < m; ++r) {
      for (int t = 0; t < 4; ++t) c[t] = coef[(q + t) * m + r];
      axpy_int8<4>(partial + r * n, w, c, n, nullptr);
    }
  }
  for (; q < end; ++q) {
    w[0] = qt + kept[q] * n;
    for (int64_t r = 0; r < m; ++r) {
      c[0] = coef[q * m + r];
      axpy_int8<1>(partial + r * n, w, c, n, nullptr);
    }
  }
}

// ---- int4 weights (wisparse_cpu::sparse_gemv_int4) ----
// out[r, :] = sum_{i kept for row r} x[r, i] * (code[i, :] * scale[i, group]) + bias: 4-bit codes
// (two's complement nibbles, -8..7, no zero point) grouped along the output dimension (kInt4Block = 32
// consecutive outputs share scale[i, g]), input-major so a pruned channel skips one contiguous
// packed row of ceil(out/2) bytes (wisparse_compile/quant/primitives.py, quantize_int4). Within a block
// of r outputs (32, or fewer for the last one) h = ceil(r/2): byte b holds output b in its low
// nibble and output b + h in its high nibble, so one 16-byte load of a full block gives outputs
// 0-15 (low nibbles: shift left 28, arithmetic shift right 28) and 16-31 (the sign-extended bytes
// shifted right by 4) without a shuffle. Same scan, chunking and partials as int8; rows go eight at
// a time, each row's coefficient x * scale[i, g] set once per block, and the partial block
// (out % 32 != 0) runs scalar.
constexpr int64_t kInt4Block = 32;

inline int int4_low(uint8_t b) { return static_cast<int>(static_cast<int8_t>(static_cast<uint8_t>(b << 4))) >> 4; }
inline int int4_high(uint8_t b) { return static_cast<int>(static_cast<int8_t>(b)) >> 4; }

#if defined(__AVX512F__)
// 16 packed bytes of a full block -> outputs 0-15 (lo) and 16-31 (hi) as fp32: a 16-entry table
// lookup (vpermps reads only the low 4 bits of each index lane), so no shift-pair sign extension
// and no int->float conversion.
inline __m512 int4_table() {
  return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
}
inline void unpack_block16(const uint8_t* p, __m512 table, __m512& lo, __m512& hi) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_permutexvar_ps(v, table);
  hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
}
#elif defined(__AVX2__) && defined(__FMA__)
// 8 packed bytes (half a full block) -> 8 low-nibble outputs and the 8 high-nibble outputs 16 later.
inline void unpack_half8(const uint8_t* p, __m256& lo, __m256& hi) {
  const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28));
  hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 4));
}
#endif

// acc[0:n] += sum_t c[t] * scale[t][g] * code[t][0:n] for R rows; ``ahead``/``ahead_s`` (or nullptr):
// the codes and scale rows of R rows to prefetch alongside, a 64-byte line of codes per four blocks and
// one of scales per sixteen (a scale row is a separate scattered read: unprefetched, its miss stalls
// every FMA of the row behind it).
template <int R>
inline void axpy_int4(float* __restrict acc, const uint8_t* const* w, const float* const* s, const float* c,
                      int64_t n, const uint8_t* const* ahead, const float* const* ahead_s) {
  const int64_t full = n / kInt4Block;
#if defined(__AVX512F__)
  const __m512 table = int4_table();
#endif
  for (int64_t g = 0; g < full; ++g) {
    const int64_t j = g * kInt4Block, byte = g * (kInt4Block / 2);
    if (ahead && g % 4 == 0) {
      for (int t = 0; t < R; ++t) prefetch_line_i8(reinterpret_cast<const int8_t*>(ahead[t] + byte));
      if (g % 16 == 0) {
        for (int t = 0; t < R; ++t) prefetch_line_i8(reinterpret_cast<const int8_t*>(ahead_s[t] + g));
      }
    }
#if defined(__AVX512F__)
    __m512 a0 = _mm512_loadu_ps(acc + j), a1 = _mm512_loadu_ps(acc + j + 16);
    for (int t = 0; t < R; ++t) {
      const __m512 v = _mm512_set1_ps(c[t] * s[t][g]);
      __m512 lo, hi;
      unpack_block16(w[t] + byte, table, lo, hi);
      a0 = _mm512_fmadd_ps(v, lo, a0);
      a1 = _mm512_fmadd_ps(v, hi, a1);
    }
    _mm512_storeu_ps(acc + j, a0);
    _mm512_storeu_ps(acc + j + 16, a1);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a0 = _mm256_loadu_ps(acc + j), a1 = _mm256_loadu_ps(acc + j + 8);
    __m256 a2 = _mm256_loadu_ps(acc + j + 16), a3 = _mm256_loadu_ps(acc + j + 24);
    for (int t = 0; t < R; ++t) {
      const __m256 v = _mm256_set1_ps(c[t] * s[t][g]);
      __m256 lo, hi;
      unpack_half8(w[t] + byte, lo, hi);  // outputs 0-7 and 16-23
      a0 = _mm256_fmadd_ps(v, lo, a0);
      a2 = _mm256_fmadd_ps(v, hi, a2);
      unpack_half8(w[t] + byte + 8, lo, hi);  // outputs 8-15 and 24-31
      a1 = _mm256_fmadd_ps(v, lo, a1);
      a3 = _mm256_fmadd_ps(v, hi, a3);
    }
    _mm256_storeu_ps(acc + j, a0);
    _mm256_storeu_ps(acc + j + 8, a1);
    _mm256_storeu_ps(acc + j + 16, a2);
    _mm256_storeu_ps(acc + j + 24, a3);
#else
    for (int64_t b = 0; b < kInt4Block / 2; ++b) {
      float lo = 0.0f, hi = 0.0f;
      for (int t = 0; t < R; ++t) {
        const float v = c[t] * s[t][g];
        lo += v * static_cast<float>(int4_low(w[t][byte + b]));
        hi += v * static_cast<float>(int4_high(w[t][byte + b]));
      }
      acc[j + b] += lo;
      acc[j + b + kInt4Block / 2] += hi;
    }
#endif
  }
  const int64_t rest = n - full * kInt4Block;  // the last, partial block: h = ceil(rest / 2)
  if (rest > 0) {
    const int64_t j0 = full * kInt4Block, byte0 = full * (kInt4Block / 2), h = (rest + 1) / 2;
    for (int64_t b = 0; b < rest; ++b) {
      float sum = 0.0f;
      for (int t = 0; t < R; ++t) {
        const uint8_t packed = w[t][byte0 + (b < h ? b : b - h)];
        sum += c[t] * s[t][full] * static_cast<float>(b < h ? int4_low(packed) : int4_high(packed));
      }
      acc[j0 + b] += sum;
    }
  }
}

// Kept channels [begin, end) of the packed codes into partial [m, n]: groups of eight rows (then 4,
// then 1), the rows about kInt8PrefetchBytes later prefetched alongside.
void stream_rows_int4(const uint8_t* packed, const float* scale, int64_t n, const int64_t* kept, const float* coef,
                      int64_t m, int64_t begin, int64_t end, float* partial) {
  constexpr int G = kInt8Group;
  const int64_t row_bytes = (n + 1) / 2, groups = (n + kInt4Block - 1) / kInt4Block;
  const int64_t ahead = std::max<int64_t>(G, kInt8PrefetchBytes / std::max<int64_t>(row_bytes, 1)) / G * G;
  const uint8_t* w[8];
  const float* s[8];
  const uint8_t* pre[8];
  const float* pre_s[8];
  float c[8];
  auto point = [&](int64_t q, int count) {
    for (int t = 0; t < count; ++t) {
      w[t] = packed + kept[q + t] * row_bytes;
      s[t] = scale + kept[q + t] * groups;
    }
  };
  int64_t q = begin;
  for (; q + G <= end; q += G) {
    point(q, G);
    const bool prefetch = q + ahead + G <= end;
    if (prefetch) {
      for (int t = 0; t < G; ++t) {
        pre[t] = packed + kept[q + ahead + t] * row_bytes;
        pre_s[t] = scale + kept[q + ahead + t] * groups;
      }
    }
    for (int64_t r = 0; r < m; ++r) {
      for (int t = 0; t < G; ++t) c[t] = coef[(q + t) * m + r];
      axpy_int4<G>(partial + r * n, w, s, c, n, prefetch && r == 0 ? pre : nullptr, pre_s);
    }
  }
  for (; q + 4 <= end; q += 4) {
    point(q, 4);
    for (int64_t r = 0; r < m; ++r) {
      for (int t = 0; t < 4; ++t) c[t] = coef[(q + t) * m + r];
      axpy_int4<4>(partial + r * n, w, s, c, n, nullptr, nullptr);
    }
  }
  for (; q < end; ++q) {
    point(q, 1);
    for (int64_t r = 0; r < m; ++r) {
      c[0] = coef[q * m + r];
      axpy_int4<1>(partial + r * n, w, s, c, n, nullptr, nullptr);
    }
  }
}

// ---- quantized calls: one weight, or a group of siblings that read the same x ----
// out = cat([x_i-masked x @ dequantized W_i + b_i for each weight i], -1): each weight keeps its own
// thresholds, and one run_segments call streams them all, so q/k/v (or gate/up) cost one dispatch,
// one scan of x per weight and one split between threads.

// One weight of a quantized call, checked: its codes, fp32 scales, optional fp32 bias [n] and
// thresholds [k] (undefined when absent), and its output count.
struct QuantizedOperand {
  at::Tensor codes, scale, bias, thresholds;
  int64_t n = 0;
};

void check_x(const char* op, const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [rows, in], got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              op, ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) == k, op, ": x has ", x.size(1), " channels, the weight has ", k);
  TORCH_CHECK(x.size(0) <= kMaxRows, op, ": at most ", kMaxRows, " rows, got ", x.size(0));
}

// An optional per-channel vector (thresholds [k], bias [n]) checked for ``count`` entries and widened
// to contiguous fp32 (no copy when it already is); undefined when absent.
at::Tensor fp32_vector(const char* op, const char* what, const c10::optional<at::Tensor>& vector, int64_t count) {
  if (!vector.has_value() || !vector->defined()) return at::Tensor();
  TORCH_CHECK(vector->numel() == count, op, ": ", what, " must have ", count, " entries");
  return vector->to(at::kFloat).contiguous();
}

QuantizedOperand quantized_operand(const char* op, const at::Tensor& codes, const at::Tensor& scale, int64_t n,
                                   const c10::optional<at::Tensor>& bias,
                                   const c10::optional<at::Tensor>& thresholds) {
  TORCH_CHECK(codes.device().is_cpu() && scale.device().is_cpu(), op, ": CPU tensors only");
  QuantizedOperand operand;
  operand.codes = codes;
  operand.scale = scale.to(at::kFloat).contiguous();
  operand.n = n;
  operand.thresholds = fp32_vector(op, "thresholds", thresholds, codes.size(0));
  operand.bias = fp32_vector(op, "bias", bias, n);
  return operand;
}

QuantizedOperand int8_operand(const char* op, const at::Tensor& qt, const at::Tensor& scale,
                              const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& thresholds) {
  TORCH_CHECK(qt.dim() == 2 && qt.is_contiguous() && qt.scalar_type() == at::kChar,
              op, ": qt must be the contiguous int8 input-major weight [in, out]");
  TORCH_CHECK(scale.numel() == qt.size(1), op, ": scale must have ", qt.size(1), " entries");
  return quantized_operand(op, qt, scale, qt.size(1), bias, thresholds);
}

QuantizedOperand int4_operand(const char* op, const at::Tensor& packed, const at::Tensor& scale, int64_t n,
                              const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& thresholds) {
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kByte,
              op, ": packed must be the contiguous uint8 input-major codes [in, ceil(out/2)]");
  TORCH_CHECK(n >= 0 && packed.size(1) == (n + 1) / 2, op, ": packed has ", packed.size(1), " bytes per row, ", n,
              " outputs need ", (n + 1) / 2);
  const int64_t groups = (n + kInt4Block - 1) / kInt4Block;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == packed.size(0) && scale.size(1) == groups, op, ": scale must be [",
              packed.size(0), ", ", groups, "] (one per 32 outputs), got ", scale.sizes());
  return quantized_operand(op, packed, scale, n, bias, thresholds);
}

// Runs the segments of ``operands`` (all [k, ...] weights of one x) into one [m, sum(n)] output:
// stream(operand, segment, begin, end, partial) accumulates kept rows, and the epilogue adds the
// partials, then scale_out[j] (nullptr: 1) and the bias per output column, and casts to x's dtype.
template <typename Stream>
at::Tensor run_quantized(const char* op, const at::Tensor& x, const std::vector<QuantizedOperand>& operands,
                         bool scale_in_epilogue, int64_t (*row_bytes)(int64_t n), const Stream& stream) {
  TORCH_CHECK(!operands.empty(), op, ": needs at least one weight");
  const int64_t k = operands[0].codes.size(0), m = x.size(0);
  check_x(op, x, k);
  int64_t total = 0;
  for (const QuantizedOperand& operand : operands) {
    TORCH_CHECK(operand.codes.size(0) == k, op, ": every weight must have ", k, " input channels (x's), got ",
                operand.codes.size(0));
    total += operand.n;
  }
  at::Tensor out = at::empty({m, total}, x.options());
  if (m == 0 || total == 0) return out;
  const at::Tensor xc = x.contiguous();
  const int64_t count = static_cast<int64_t>(operands.size());
  auto run = [&](const auto* xp, auto* outp) {
    Segment* segments = segments_for(count);
    for (int64_t i = 0; i < count; ++i) {
      segments[i].thresholds = operands[i].thresholds.defined() ? operands[i].thresholds.data_ptr<float>() : nullptr;
      segments[i].n = operands[i].n;
      segments[i].row_bytes = row_bytes(operands[i].n);
    }
    std::vector<int64_t> column(count, 0);
    for (int64_t i = 1; i < count; ++i) column[i] = column[i - 1] + operands[i - 1].n;
    run_segments(
        xp, m, k, segments, count,
        [&](int64_t i, int64_t begin, int64_t end, float* partial) {
          stream(operands[i], segments[i], begin, end, partial, m);
        },
        [&](int64_t i, const float* const* partials, int64_t parts) {
          const int64_t n = operands[i].n;
          const float* scale = scale_in_epilogue ? operands[i].scale.data_ptr<float>() : nullptr;
          const float* bias = operands[i].bias.defined() ? operands[i].bias.data_ptr<float>() : nullptr;
          for (int64_t r = 0; r < m; ++r) {
            for (int64_t j = 0; j < n; ++j) {
              float v = 0.0f;
              for (int64_t c = 0; c < parts; ++c) v += partials[c][r * n + j];
              from_f32((scale ? v * scale[j] : v) + (bias ? bias[j] : 0.0f), outp + r * total + column[i] + j);
            }
          }
        });
  };
  if (x.scalar_type() == at::kFloat) {
    run(xc.data_ptr<float>(), out.data_ptr<float>());
  } else {
    run(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()),
        reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  }
  return out;
}

int64_t int8_row_bytes(int64_t n) { return n; }
int64_t int4_row_bytes(int64_t n) { return (n + 1) / 2 + (n + kInt4Block - 1) / kInt4Block * 4; }  // codes + scales

at::Tensor run_int8(const char* op, const at::Tensor& x, const std::vector<QuantizedOperand>& operands) {
  return run_quantized(op, x, operands, true, int8_row_bytes,
                       [](const QuantizedOperand& w, const Segment& seg, int64_t begin, int64_t end, float* partial,
                          int64_t m) {
                         stream_rows_int8(w.codes.data_ptr<int8_t>(), w.n, seg.kept.data(), seg.coef.data(), m, begin,
                                          end, partial);
                       });
}

at::Tensor run_int4(const char* op, const at::Tensor& x, const std::vector<QuantizedOperand>& operands) {
  return run_quantized(op, x, operands, false, int4_row_bytes,
                       [](const QuantizedOperand& w, const Segment& seg, int64_t begin, int64_t end, float* partial,
                          int64_t m) {
                         stream_rows_int4(w.codes.data_ptr<uint8_t>(), w.scale.data_ptr<float>(), w.n, seg.kept.data(),
                                          seg.coef.data(), m, begin, end, partial);
                       });
}

at::Tensor sparse_gemv_int8_cpu(const at::Tensor& x, const at::Tensor& qt, const at::Tensor& scale,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& thresholds) {
  constexpr const char* op = "wisparse_cpu::sparse_gemv_int8";
  return run_int8(op, x, {int8_operand(op, qt, scale, bias, thresholds)});
}

at::Tensor sparse_gemv_int4_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t n,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& thresholds) {
  constexpr const char* op = "wisparse_cpu::sparse_gemv_int4";
  return run_int4(op, x, {int4_operand(op, packed, scale, n, bias, thresholds)});
}

// The group ops take one list entry per weight; every list must have one entry per weight.
void check_group_lengths(const char* op, size_t weights, size_t scales, size_t biases, size_t thresholds) {
  TORCH_CHECK(weights >= 1 && scales == weights && biases == weights && thresholds == weights, op,
              ": needs one scale, bias (or None) and thresholds (or None) per weight; got ", weights, " weights, ",
              scales, " scales, ", biases, " biases, ", thresholds, " thresholds");
}

at::Tensor sparse_gemv_int8_group_cpu(const at::Tensor& x, at::TensorList qts, at::TensorList scales,
                                      const c10::List<c10::optional<at::Tensor>>& biases,
                                      const c10::List<c10::optional<at::Tensor>>& thresholds) {
  constexpr const char* op = "wisparse_cpu::sparse_gemv_int8_group";
  check_group_lengths(op, qts.size(), scales.size(), biases.size(), thresholds.size());
  std::vector<QuantizedOperand> operands;
  for (size_t i = 0; i < qts.size(); ++i) operands.push_back(int8_operand(op, qts[i], scales[i], biases[i], thresholds[i]));
  return run_int8(op, x, operands);
}

at::Tensor sparse_gemv_int4_group_cpu(const at::Tensor& x, at::TensorList packed, at::TensorList scales,
                                      at::IntArrayRef ns, const c10::List<c10::optional<at::Tensor>>& biases,
                                      const c10::List<c10::optional<at::Tensor>>& thresholds) {
  constexpr const char* op = "wisparse_cpu::sparse_gemv_int4_group";
  check_group_lengths(op, packed.size(), scales.size(), biases.size(), thresholds.size());
  TORCH_CHECK(ns.size() == packed.size(), op, ": needs one output count per weight");
  std::vector<QuantizedOperand> operands;
  for (size_t i = 0; i < packed.size(); ++i) {
    operands.push_back(int4_operand(op, packed[i], scales[i], ns[i], biases[i], thresholds[i]));
  }
  return run_int4(op, x, operands);
}

at::Tensor sparse_gemv_cpu(const at::Tensor& x, const at::Tensor& wt, const c10::optional<at::Tensor>& bias,
                           const at::Tensor& thresholds) {
  constexpr const char* op = "wisparse_cpu::sparse_gemv";
  TORCH_CHECK(wt.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(wt.dim() == 2 && wt.is_contiguous(), op, ": wt must be the contiguous input-major weight [in, out] (W.t())");
  check_x(op, x, wt.size(0));
  TORCH_CHECK(x.scalar_type() == wt.scalar_type(), op, ": x and wt dtypes differ");
  const int64_t m = x.size(0), k = wt.size(0), n = wt.size(1);
  const at::Tensor tf = fp32_vector(op, "thresholds", thresholds, k);
  const at::Tensor bf = fp32_vector(op, "bias", bias, n);

  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  if (wt.scalar_type() == at::kFloat) {
    sparse_gemv_impl(xc.data_ptr<float>(), wt.data_ptr<float>(), bp, tf.data_ptr<float>(), m, k, n,
                     out.data_ptr<float>());
  } else {
    sparse_gemv_impl(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()),
                     reinterpret_cast<const uint16_t*>(wt.data_ptr<at::BFloat16>()), bp, tf.data_ptr<float>(), m,
                     k, n, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  }
  return out;
}

// How many distinct threads an at::parallel_for over ``items`` single items runs on: the check that
// the extension really runs its chunks in parallel (a build without OpenMP returns 1).
int64_t parallel_threads(int64_t items) {
  std::vector<char> seen(std::max<int64_t>(1, at::get_num_threads()), 0);
  at::parallel_for(0, std::max<int64_t>(items, 1), 1, [&](int64_t, int64_t) {
    const int64_t t = at::get_thread_num();
    if (t >= 0 && t < static_cast<int64_t>(seen.size())) seen[t] = 1;
  });
  return std::count(seen.begin(), seen.end(), 1);
}

}  // namespace

TORCH_LIBRARY(wisparse_cpu, m) {
  m.def("sparse_gemv(Tensor x, Tensor wt, Tensor? bias, Tensor thresholds) -> Tensor");
  m.def("sparse_gemv_int8(Tensor x, Tensor qt, Tensor scale, Tensor? bias, Tensor? thresholds) -> Tensor");
  m.def("sparse_gemv_int4(Tensor x, Tensor packed, Tensor scale, int n, Tensor? bias, Tensor? thresholds) -> Tensor");
  m.def("sparse_gemv_int8_group(Tensor x, Tensor[] qts, Tensor[] scales, Tensor?[] biases, Tensor?[] thresholds) -> Tensor");
  m.def("sparse_gemv_int4_group(Tensor x, Tensor[] packed, Tensor[] scales, int[] ns, Tensor?[] biases, Tensor?[] thresholds) -> Tensor");
  m.def("parallel_threads(int items) -> int", &parallel_threads);
}

TORCH_LIBRARY_IMPL(wisparse_cpu, CPU, m) {
  m.impl("sparse_gemv", &sparse_gemv_cpu);
  m.impl("sparse_gemv_int8", &sparse_gemv_int8_cpu);
  m.impl("sparse_gemv_int4", &sparse_gemv_int4_cpu);
  m.impl("sparse_gemv_int8_group", &sparse_gemv_int8_group_cpu);
  m.impl("sparse_gemv_int4_group", &sparse_gemv_int4_group_cpu);
}
