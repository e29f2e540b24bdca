// softmax(q k^T / sqrt(d)) v for float32 on the CPU, fused: an XLA FFI handler (jax.ffi) that elite_jax builds
// with the machine's C++ compiler on first use (elite_jax/native/__init__.py says how and why).
//
// Layout: q (..., Lq, H, D), k (..., Lk, H, D), v (..., Lk, H, Dv) -> out (..., Lq, H, Dv) and the log of each
// query's softmax denominator, lse (..., H, Lq) (for the backward pass, which is XLA's), the leading axes one
// batch axis. Work items are blocks of kQ queries of one (batch, head), shared out over XLA's intra-op thread pool.
// For each block the scores never leave the cache: over tiles of kK keys, S^T = K Q^T, an online softmax (running
// max and sum per query), O^T += V^T P^T, and one division at the end. Everything is vectorised over the block's
// queries (kQV vectors of kW floats), so no step needs a horizontal reduction and any head width works.
//
// The vector width and the register blocking follow the target the compiler is given (-march): 16 floats and
// 6 x 4 accumulators where there are 32 vector registers (AVX-512), 8 floats and 4 x 3 where AVX/AVX2 have 16, and
// 4 floats (SSE2, NEON, or plain C++ where neither) otherwise. A width a target does not have is still correct,
// only slow: GCC splits the vectors (16 floats on AVX2 ran 13x slower than XLA). -DELITE_ATTENTION_WIDTH=4|8|16
// forces a width (the tests build each).

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <thread>

#include <unistd.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#ifndef ELITE_ATTENTION_WIDTH
#if defined(__AVX512F__)
#define ELITE_ATTENTION_WIDTH 16
#elif defined(__AVX__)
#define ELITE_ATTENTION_WIDTH 8
#else
#define ELITE_ATTENTION_WIDTH 4
#endif
#endif

#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int kRegisters = 32;
#else
constexpr int kRegisters = 16;
#endif

// The blocking, overridable for tuning (-DELITE_ATTENTION_QV=..., _R, _K).
#ifndef ELITE_ATTENTION_QV
#define ELITE_ATTENTION_QV (kRegisters == 32 ? 6 : 4)
#endif
#ifndef ELITE_ATTENTION_R
#define ELITE_ATTENTION_R (kRegisters == 32 ? 4 : 3)
#endif
#ifndef ELITE_ATTENTION_K
#define ELITE_ATTENTION_K 64
#endif
constexpr int kW = ELITE_ATTENTION_WIDTH;  // floats per vector
constexpr int kQV = ELITE_ATTENTION_QV;    // vectors of queries per block
constexpr int kQ = kW * kQV;               // queries per block
constexpr int kR = ELITE_ATTENTION_R;      // keys per score micro-kernel: kR x kQV accumulators
constexpr int kC = kR;                     // value channels per output micro-kernel: kC x kQV accumulators
constexpr int kK = ELITE_ATTENTION_K;      // keys per tile: the (kK, kQ) tile of scores stays in L1
// Measured on an Intel Xeon with AVX-512 (BENCHMARKS.md, "CPU speed on every x86 CPU"): 4 x 4 accumulators and
// 128-key tiles ran 15% slower with AVX-512; with AVX2, blockings of 12 accumulators were best (4 x 3, 3 x 4).

typedef float V __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t VI __attribute__((vector_size(kW * sizeof(int32_t))));

// x - 0 rather than 0 + x: the compiler may drop a subtraction of +0 (it is exact for every x, -0 included), so the
// splat is one broadcast; 0 + x costs a scalar add before each broadcast (it is not exact for x = -0).
inline V splat(float x) { return x - V{}; }
inline V load(const float* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
inline void store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
inline V vmax(V a, V b) { return a > b ? a : b; }

// 2^x for x <= 0 (the scores are kept in base 2: log2(e) is folded into the query scale): 2^n 2^f with n the
// nearest integer and f in [-1/2, 1/2] exact, 2^f by a degree-6 minimax polynomial (relative error 1e-7 in float32;
// degree 5, 2.4e-7, was 2% faster but its error over 4096 keys reached 2.1e-6 against 1.3e-6, PyTorch's 1.2e-6);
// arguments below -126 give 2^-126 instead of 0. t = x + 1.5 * 2^23 + 127 rounds x to an integer in t's low bits,
// already biased: shifted into the exponent field they are 2^n (the rest of t's bits fall off).
inline V vexp2(V x) {
  x = vmax(x, splat(-126.0f));
  const V magic = splat(12582912.0f + 127.0f);
  const V t = x + magic;
  const V f = x - (t - magic);
  V p = splat(1.535336188319500e-4f);
  p = p * f + splat(1.339887440266574e-3f);
  p = p * f + splat(9.618437357674640e-3f);
  p = p * f + splat(5.550332471162809e-2f);
  p = p * f + splat(2.402264791363012e-1f);
  p = p * f + splat(6.931472028550421e-1f);
  p = p * f + splat(1.0f);
  VI bits;
  std::memcpy(&bits, &t, sizeof(V));
  bits = bits << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(V));
  return p * scale;
}

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

// Cache lines of `rows` rows of `width` floats, `stride` floats apart: the next keys' rows, fetched while the
// current ones are multiplied (streaming them from L2 cost 10-15% of the score micro-kernel's time).
inline void prefetch_rows(const float* p, int64_t stride, int rows, int64_t width) {
  for (int r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < width; c += 64 / sizeof(float)) __builtin_prefetch(p + r * stride + c);
    __builtin_prefetch(p + r * stride + width - 1);
  }
}

struct Shape {
  int64_t batch, lq, lk, heads, d, dv;
};

// Per worker: the block's queries transposed and scaled (d, kQ), a tile of scores (kK, kQ), the output (dv, kQ).
struct Scratch {
  float* qt;
  float* s;
  float* ot;
  explicit Scratch(const Shape& sh) {
    size_t n = (sh.d + kK + sh.dv) * kQ;
    base = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
    qt = base;
    s = qt + sh.d * kQ;
    ot = s + kK * kQ;
  }
  ~Scratch() { std::free(base); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

 private:
  float* base;
};

// S^T[j, :] = sum_c K[j, c] Q^T[c, :] for R keys at once (R x kQV accumulators).
template <int R>
inline void scores(const float* k, int64_t kstride, const float* qt, int64_t d, float* s) {
  V acc[R][kQV];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < kQV; ++u) acc[r][u] = V{};
  for (int64_t c = 0; c < d; ++c) {
    V qv[kQV];
    for (int u = 0; u < kQV; ++u) qv[u] = load(qt + c * kQ + u * kW);
    for (int r = 0; r < R; ++r) {
      V kb = splat(k[r * kstride + c]);
      for (int u = 0; u < kQV; ++u) acc[r][u] += kb * qv[u];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < kQV; ++u) store(s + r * kQ + u * kW, acc[r][u]);
}

// O^T[c, :] += sum_j V[j, c] P^T[j, :] for C channels at once, over the tile's nk keys.
template <int C>
inline void accumulate(const float* v, int64_t vstride, const float* s, int64_t nk, float* ot) {
  V acc[C][kQV];
  for (int c = 0; c < C; ++c)
    for (int u = 0; u < kQV; ++u) acc[c][u] = load(ot + c * kQ + u * kW);
  for (int64_t j = 0; j < nk; ++j) {
    V pv[kQV];
    for (int u = 0; u < kQV; ++u) pv[u] = load(s + j * kQ + u * kW);
    for (int c = 0; c < C; ++c) {
      V vb = splat(v[j * vstride + c]);
      for (int u = 0; u < kQV; ++u) acc[c][u] += vb * pv[u];
    }
  }
  for (int c = 0; c < C; ++c)
    for (int u = 0; u < kQV; ++u) store(ot + c * kQ + u * kW, acc[c][u]);
}

// One (batch, head)'s keys and values: rows kstride and vstride floats apart.
struct Head {
  const float* k;
  const float* v;
  int64_t kstride, vstride;
};

// One block: queries [i0, i0 + nq) of head h of batch row b, over that head's keys and values kv.
void block(const Shape& sh, const float* q, const Head& kv, float* out, float* lse, int64_t b, int64_t h,
           int64_t i0, Scratch& w) {
  const int64_t d = sh.d, dv = sh.dv, heads = sh.heads;
  const int64_t nq = std::min<int64_t>(kQ, sh.lq - i0);
  const float scale = kLog2e / std::sqrt(static_cast<float>(d));  // base-2 scores
  // Q^T, scaled, with the block's missing queries zero (their results are not written).
  if (nq < kQ) std::fill(w.qt, w.qt + d * kQ, 0.0f);
  // Loads strided, stores contiguous (the other order stored to a new cache line at every element: 10-20% of a
  // block with 160-wide heads over 77 keys).
  const float* qb = q + ((b * sh.lq + i0) * heads + h) * d;
  for (int64_t c = 0; c < d; ++c)
    for (int64_t i = 0; i < nq; ++i) w.qt[c * kQ + i] = qb[i * heads * d + c] * scale;
  std::fill(w.ot, w.ot + dv * kQ, 0.0f);
  V m[kQV], l[kQV];
  for (int u = 0; u < kQV; ++u) {
    m[u] = splat(-FLT_MAX);
    l[u] = V{};
  }
  const int64_t kstride = kv.kstride, vstride = kv.vstride;
  const float* kh = kv.k;
  const float* vh = kv.v;
  const bool contiguous = kstride == d && vstride == dv;
  // Tiles of equal size (a multiple of kR up to kK): 77 text tokens are 2 x 39 keys, not 64 + 13, whose short
  // second tile spent more on its micro-kernels' set-up than on their loops.
  const int64_t tiles = (sh.lk + kK - 1) / kK;
  const int64_t tile = std::min<int64_t>(kK, ((sh.lk + tiles - 1) / tiles + kR - 1) / kR * kR);
  for (int64_t j0 = 0; j0 < sh.lk; j0 += tile) {
    const int64_t nk = std::min<int64_t>(tile, sh.lk - j0);
    int64_t j = 0;
    for (; j + kR <= nk; j += kR) {
      if (!contiguous) {  // rows of a copy stream in order: the hardware prefetches them (3% faster without these)
        const int64_t next = j0 + j + kR;
        if (next + kR <= sh.lk) prefetch_rows(kh + next * kstride, kstride, kR, d);
        prefetch_rows(vh + (j0 + j) * vstride, vstride, kR, dv);  // for O^T below
      }
      scores<kR>(kh + (j0 + j) * kstride, kstride, w.qt, d, w.s + j * kQ);
    }
    for (; j < nk; ++j) scores<1>(kh + (j0 + j) * kstride, kstride, w.qt, d, w.s + j * kQ);
    // Online softmax: rescale what was summed under the old max, exponentiate the tile under the new one.
    V tmax[kQV];
    for (int u = 0; u < kQV; ++u) tmax[u] = m[u];
    for (int64_t jj = 0; jj < nk; ++jj)
      for (int u = 0; u < kQV; ++u) tmax[u] = vmax(tmax[u], load(w.s + jj * kQ + u * kW));
    V alpha[kQV];
    for (int u = 0; u < kQV; ++u) {
      alpha[u] = vexp2(m[u] - tmax[u]);
      m[u] = tmax[u];
    }
    V sum[kQV] = {};
    for (int64_t jj = 0; jj < nk; ++jj)
      for (int u = 0; u < kQV; ++u) {
        V p = vexp2(load(w.s + jj * kQ + u * kW) - m[u]);
        store(w.s + jj * kQ + u * kW, p);
        sum[u] += p;
      }
    for (int u = 0; u < kQV; ++u) l[u] = l[u] * alpha[u] + sum[u];
    if (j0 > 0)
      for (int64_t c = 0; c < dv; ++c)
        for (int u = 0; u < kQV; ++u) store(w.ot + c * kQ + u * kW, load(w.ot + c * kQ + u * kW) * alpha[u]);
    const float* vt = vh + j0 * vstride;
    int64_t c = 0;
    for (; c + kC <= dv; c += kC) accumulate<kC>(vt + c, vstride, w.s, nk, w.ot + c * kQ);
    for (; c < dv; ++c) accumulate<1>(vt + c, vstride, w.s, nk, w.ot + c * kQ);
  }
  float inv[kQ], lm[kQ], ll[kQ];
  for (int u = 0; u < kQV; ++u) {
    store(inv + u * kW, splat(1.0f) / l[u]);
    store(lm + u * kW, m[u]);
    store(ll + u * kW, l[u]);
  }
  float* lse_h = lse + (b * heads + h) * sh.lq + i0;
  for (int64_t i = 0; i < nq; ++i) lse_h[i] = (lm[i] + std::log2(ll[i])) * kLn2;  // natural log
  for (int64_t i = 0; i < nq; ++i) {
    float* oi = out + ((b * sh.lq + i0 + i) * heads + h) * dv;
    for (int64_t c = 0; c < dv; ++c) oi[c] = w.ot[c * kQ + i] * inv[i];
  }
}

// Whether the heads' keys and values are copied to rows of their own before use. In the inputs, one head's rows
// are heads * d floats apart; every block of the head reads them all, from L2 while they stay there. Once a head's
// keys and values outgrow half of L2 (with the other heads' columns sharing their cache lines), the blocks stream
// them from L3 instead: contiguous copies fit and stream in order. Measured on an Intel Xeon with 2 MiB of L2
// (BENCHMARKS.md): 4096 keys x 40 + 40 (1.3 MiB a head) ran 10% faster copied; 1024 x 80 + 80 and 256 x 160 + 160
// ran 2-9% slower, the copy costing more than it saved. -DELITE_ATTENTION_COPY=0|1 forces either (the tests).
#ifndef ELITE_ATTENTION_COPY
#define ELITE_ATTENTION_COPY -1
#endif
bool copy_heads(const Shape& sh) {
  if (ELITE_ATTENTION_COPY >= 0) return ELITE_ATTENTION_COPY;
  static const int64_t l2 = [] {
    const long bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return bytes > 0 ? static_cast<int64_t>(bytes) : int64_t{1} << 20;  // unknown: 1 MiB
  }();
  const int64_t head_bytes = sh.lk * (sh.d + sh.dv) * static_cast<int64_t>(sizeof(float));
  return head_bytes > std::min<int64_t>(l2 / 2, int64_t{1} << 20);
}

// Items handed out by an atomic counter to the caller and the pool's workers. A worker that starts after the
// last item was taken returns at once: the state is shared so that such a late worker never touches freed memory.
// Items go head by head, so the workers share each head's keys and values while they are in cache; where heads
// are copied (copy_heads), the first worker to need a head's keys copies them, the next its values (or the first
// both), and a worker that needs a part being copied waits for it.
struct Work {
  Shape sh;
  const float *q, *k, *v;
  float* out;
  float* lse;
  int64_t blocks_per_head, total;
  std::unique_ptr<float[]> copies;  // the keys, then the values, (batch * heads, lk, d) and (batch * heads, lk, dv)
  std::unique_ptr<std::atomic<int>[]> copied;  // per (batch, head) and part: 0 not yet, 1 being copied, 2 copied
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable cv;

  Head head(int64_t bh) {
    const int64_t b = bh / sh.heads, h = bh % sh.heads;
    if (!copies) {
      return {k + (b * sh.lk * sh.heads + h) * sh.d, v + (b * sh.lk * sh.heads + h) * sh.dv, sh.heads * sh.d,
              sh.heads * sh.dv};
    }
    float* kc = copies.get() + bh * sh.lk * sh.d;
    float* vc = copies.get() + sh.batch * sh.heads * sh.lk * sh.d + bh * sh.lk * sh.dv;
    for (int part = 0; part < 2; ++part) {
      std::atomic<int>& state = copied[2 * bh + part];
      int expected = 0;
      if (state.load(std::memory_order_acquire) == 0 && state.compare_exchange_strong(expected, 1)) {
        const int64_t width = part == 0 ? sh.d : sh.dv;
        const float* src = (part == 0 ? k : v) + (b * sh.lk * sh.heads + h) * width;
        float* dst = part == 0 ? kc : vc;
        for (int64_t j = 0; j < sh.lk; ++j)
          std::memcpy(dst + j * width, src + j * sh.heads * width, width * sizeof(float));
        state.store(2, std::memory_order_release);
      }
    }
    for (int part = 0; part < 2; ++part)
      while (copied[2 * bh + part].load(std::memory_order_acquire) != 2) std::this_thread::yield();
    return {kc, vc, sh.d, sh.dv};
  }

  void run() {
    int64_t i = next.fetch_add(1);
    if (i >= total) return;
    Scratch w(sh);
    for (; i < total; i = next.fetch_add(1)) {
      const int64_t bh = i / blocks_per_head, qb = i % blocks_per_head;
      block(sh, q, head(bh), out, lse, bh / sh.heads, bh % sh.heads, qb * kQ, w);
      if (done.fetch_add(1) + 1 == total) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                     ffi::ResultBuffer<ffi::F32> lse) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const size_t rank = qd.size();
  if (rank < 3 || kd.size() != rank || vd.size() != rank)
    return ffi::Error::InvalidArgument("elite_cpu_attention: q, k, v must be (..., L, H, D) of one rank");
  auto work = std::make_shared<Work>();
  Shape& sh = work->sh;
  sh.batch = 1;
  for (size_t a = 0; a + 3 < rank; ++a) {
    if (kd[a] != qd[a] || vd[a] != qd[a])
      return ffi::Error::InvalidArgument("elite_cpu_attention: q, k, v differ in their batch axes");
    sh.batch *= qd[a];
  }
  sh.lq = qd[rank - 3];
  sh.heads = qd[rank - 2];
  sh.d = qd[rank - 1];
  sh.lk = kd[rank - 3];
  sh.dv = vd[rank - 1];
  if (kd[rank - 2] != sh.heads || vd[rank - 2] != sh.heads || kd[rank - 1] != sh.d || vd[rank - 3] != sh.lk)
    return ffi::Error::InvalidArgument("elite_cpu_attention: k and v do not match q's heads, width or keys");
  if (sh.lk == 0) return ffi::Error::InvalidArgument("elite_cpu_attention: no keys");
  work->q = q.typed_data();
  work->k = k.typed_data();
  work->v = v.typed_data();
  work->out = out->typed_data();
  work->lse = lse->typed_data();
  work->blocks_per_head = (sh.lq + kQ - 1) / kQ;
  work->total = sh.batch * sh.heads * work->blocks_per_head;
  if (work->total == 0) return ffi::Error::Success();
  if (copy_heads(sh)) {  // where the memory cannot be had, the heads are read in place
    work->copies.reset(new (std::nothrow) float[sh.batch * sh.heads * sh.lk * (sh.d + sh.dv)]);
    work->copied.reset(new (std::nothrow) std::atomic<int>[2 * sh.batch * sh.heads]());
    if (!work->copies || !work->copied) work->copies.reset();
  }
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, work->total - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->run(); });
  work->run();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == work->total; });
  return ffi::Error::Success();
}

}  // namespace

// What this build is, for the logs and the tests: "width=16 queries=96 keys=64 registers=32 copy=-1" (copy: -1 by
// size, 0 never, 1 always).
extern "C" const char* EliteCpuAttentionConfig() {
  static char text[96];
  std::snprintf(text, sizeof(text), "width=%d queries=%d keys=%d registers=%d copy=%d", kW, kQ, kK, kRegisters,
                ELITE_ATTENTION_COPY);
  return text;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(EliteCpuAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
