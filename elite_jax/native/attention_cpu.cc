// softmax(q k^T / sqrt(d)) v for float32 on the CPU, fused: an XLA FFI handler (jax.ffi) that elite_jax builds
// with the machine's C++ compiler on first use (elite_jax/native/__init__.py says how and why).
//
// Layout: q (..., Lq, H, D), k (..., Lk, H, D), v (..., Lk, H, Dv) -> out (..., Lq, H, Dv) and the log of each
// query's softmax denominator, lse (..., H, Lq) (for the backward pass, which is XLA's), the leading axes one
// batch axis. Work items are blocks of kQ queries of one (batch, head), shared out over XLA's intra-op thread pool.
// For each block the scores never leave the cache: over tiles of kK keys, S^T = K Q^T, an online softmax (running
// max and sum per query), O^T += V^T P^T, and one division at the end. Everything is vectorised over the block's
// queries (kQ = 4 vectors of 16 floats), so no step needs a horizontal reduction and any head width works.

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kW = 16;        // floats per vector
constexpr int kQV = 4;        // vectors of queries per block
constexpr int kQ = kW * kQV;  // queries per block
constexpr int kK = 128;       // keys per tile: a (kK, kQ) float tile of scores is 32 KB

typedef float V __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t VI __attribute__((vector_size(kW * sizeof(int32_t))));

inline V splat(float x) { return V{} + x; }
inline V load(const float* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
inline void store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
inline V vmax(V a, V b) { return a > b ? a : b; }

// exp(x) for x <= 0 (softmax arguments): 2^n e^r with |r| <= ln2 / 2, e^r by its degree-7 Taylor polynomial
// (relative error under 1e-8, below float32's rounding); arguments below -87 give about 1e-38 instead of 0.
inline V vexp(V x) {
  x = vmax(x, splat(-87.0f));
  const V magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  V n = (x * splat(1.44269504088896341f) + magic) - magic;
  V r = x - n * splat(0.693359375f);  // ln 2 in two parts, so that n * ln2 is exact for |n| < 2^9
  r = r - n * splat(-2.12194440e-4f);
  V p = splat(1.0f / 5040);
  p = p * r + splat(1.0f / 720);
  p = p * r + splat(1.0f / 120);
  p = p * r + splat(1.0f / 24);
  p = p * r + splat(1.0f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(V));
  return p * scale;
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

// S^T[j, :] = sum_c K[j, c] Q^T[c, :] for R keys at once (R x kQV accumulators); returns their max per query.
template <int R>
inline void scores(const float* k, int64_t kstride, const float* qt, int64_t d, float* s, V* tmax) {
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
    for (int u = 0; u < kQV; ++u) {
      store(s + r * kQ + u * kW, acc[r][u]);
      tmax[u] = vmax(tmax[u], acc[r][u]);
    }
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

// One block: queries [i0, i0 + nq) of head h of batch row b.
void block(const Shape& sh, const float* q, const float* k, const float* v, float* out, float* lse, int64_t b,
           int64_t h, int64_t i0, Scratch& w) {
  const int64_t d = sh.d, dv = sh.dv, heads = sh.heads;
  const int64_t nq = std::min<int64_t>(kQ, sh.lq - i0);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // Q^T, scaled, with the block's missing queries zero (their results are not written).
  if (nq < kQ) std::fill(w.qt, w.qt + d * kQ, 0.0f);
  for (int64_t i = 0; i < nq; ++i) {
    const float* qi = q + ((b * sh.lq + i0 + i) * heads + h) * d;
    for (int64_t c = 0; c < d; ++c) w.qt[c * kQ + i] = qi[c] * scale;
  }
  std::fill(w.ot, w.ot + dv * kQ, 0.0f);
  V m[kQV], l[kQV];
  for (int u = 0; u < kQV; ++u) {
    m[u] = splat(-FLT_MAX);
    l[u] = V{};
  }
  const int64_t kstride = heads * d, vstride = heads * sh.dv;
  const float* kh = k + (b * sh.lk * heads + h) * d;
  const float* vh = v + (b * sh.lk * heads + h) * dv;
  for (int64_t j0 = 0; j0 < sh.lk; j0 += kK) {
    const int64_t nk = std::min<int64_t>(kK, sh.lk - j0);
    V tmax[kQV];
    for (int u = 0; u < kQV; ++u) tmax[u] = m[u];
    int64_t j = 0;
    for (; j + 4 <= nk; j += 4) scores<4>(kh + (j0 + j) * kstride, kstride, w.qt, d, w.s + j * kQ, tmax);
    for (; j < nk; ++j) scores<1>(kh + (j0 + j) * kstride, kstride, w.qt, d, w.s + j * kQ, tmax);
    // Online softmax: rescale what was summed under the old max, exponentiate the tile under the new one.
    V alpha[kQV];
    for (int u = 0; u < kQV; ++u) {
      alpha[u] = vexp(m[u] - tmax[u]);
      m[u] = tmax[u];
    }
    V sum[kQV] = {};
    for (int64_t jj = 0; jj < nk; ++jj)
      for (int u = 0; u < kQV; ++u) {
        V p = vexp(load(w.s + jj * kQ + u * kW) - m[u]);
        store(w.s + jj * kQ + u * kW, p);
        sum[u] += p;
      }
    for (int u = 0; u < kQV; ++u) l[u] = l[u] * alpha[u] + sum[u];
    if (j0 > 0)
      for (int64_t c = 0; c < dv; ++c)
        for (int u = 0; u < kQV; ++u) store(w.ot + c * kQ + u * kW, load(w.ot + c * kQ + u * kW) * alpha[u]);
    const float* vt = vh + j0 * vstride;
    int64_t c = 0;
    for (; c + 4 <= dv; c += 4) accumulate<4>(vt + c, vstride, w.s, nk, w.ot + c * kQ);
    for (; c < dv; ++c) accumulate<1>(vt + c, vstride, w.s, nk, w.ot + c * kQ);
  }
  float inv[kQ], lm[kQ], ll[kQ];
  for (int u = 0; u < kQV; ++u) {
    store(inv + u * kW, splat(1.0f) / l[u]);
    store(lm + u * kW, m[u]);
    store(ll + u * kW, l[u]);
  }
  float* lse_h = lse + (b * heads + h) * sh.lq + i0;
  for (int64_t i = 0; i < nq; ++i) lse_h[i] = lm[i] + std::log(ll[i]);
  for (int64_t i = 0; i < nq; ++i) {
    float* oi = out + ((b * sh.lq + i0 + i) * heads + h) * dv;
    for (int64_t c = 0; c < dv; ++c) oi[c] = w.ot[c * kQ + i] * inv[i];
  }
}

// Items handed out by an atomic counter to the caller and the pool's workers. A worker that starts after the
// last item was taken returns at once: the state is shared so that such a late worker never touches freed memory.
struct Work {
  Shape sh;
  const float *q, *k, *v;
  float* out;
  float* lse;
  int64_t blocks_per_head, total;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable cv;

  void run() {
    int64_t i = next.fetch_add(1);
    if (i >= total) return;
    Scratch w(sh);
    for (; i < total; i = next.fetch_add(1)) {
      const int64_t bh = i / blocks_per_head, qb = i % blocks_per_head;
      block(sh, q, k, v, out, lse, bh / sh.heads, bh % sh.heads, qb * kQ, w);
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
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, work->total - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->run(); });
  work->run();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == work->total; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EliteCpuAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
