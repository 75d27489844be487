// Block-sparse causal attention on CPU in one pass per query block (moa-compress).
//
// Contract: the same as kernels/reference.py. q [B, Hq, Sq, D], k / v [B, Hkv, Sk, D] (GQA: query
// head h reads KV head h / (Hq / Hkv)); a layout kv_num_blocks [Bl, Hq, nQ] and kv_indices
// [Bl, Hq, nQ, maxK] (int32, ascending, Bl = 1 broadcasts over the batch) names the key blocks each
// query block computes; causality is bottom-right aligned inside them (row i sits at position
// i + Sk - Sq). Rows that see no key give zeros.
//
// Why a kernel of our own: the fused CPU flash-attention op can only be fed a block-sparse layout as
// many small calls (one per run of key blocks and mask shape) whose partial results are merged
// afterwards, and its masked calls add a mask to every score they compute. Here one work item is
// one (batch, KV head, query block): it walks exactly the selected key blocks, applies causality
// from positions (no mask tensor) and keeps an online softmax, so the sink, the band and the
// diagonal are one pass with nothing to merge. Query heads of a KV group that select the same
// blocks are folded into the rows of one item, so K/V are read once per group and never repeated.
//
// Matrix products go through ATen's batch-reduce GEMM (at::native::cpublas::brgemm, oneDNN's
// micro-kernels: AMX tiles where the CPU has them). For bfloat16 / float16 on such CPUs the right-hand
// operands are packed once per call into the VNNI layout the micro-kernel reads (see uses_packed for
// when): per KV head, K^T in chunks of 64 keys ([D / 2, 64, 2] each) and V as [Sk_padded, D] in column
// chunks of at most 64. Elsewhere the same calls run on plain row-major operands.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Keys scored per pass of the online softmax (a multiple of the block size is used).
constexpr int64_t kChunkKeys = 1024;
// Widest right-hand operand the packed micro-kernel is given (columns).
constexpr int64_t kPackWidth = 64;

// 16 floats as one value (GCC/Clang vector extensions): lowered to whatever SIMD the CPU has.
// Loads and stores go through pointers of these types (unaligned, may alias their elements):
// a memcpy into a vector local would round-trip through the stack.
typedef float vf16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t vi16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint32_t vu16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint16_t vh16 __attribute__((vector_size(32), aligned(2), may_alias));
constexpr int64_t kLanes = 16;

inline vf16 splat(float x) { return vf16{} + x; }

// 2^t for t <= 0 (and t = -inf) as 2^n * 2^f, f = t - round(t) in [-1/2, 1/2], with a Taylor
// polynomial of 2^f = e^(f ln 2) of degree `Degree`: relative error below 1.2e-7 at degree 6 (float32
// probabilities), below 5e-5 at degree 4 (probabilities rounded to bfloat16 / float16 anyway).
// Plain arithmetic, so it runs in the vector width the CPU has.
template <int Degree>
inline vf16 fast_exp2(vf16 t) {
  t = t < -126.0f ? splat(-126.0f) : t;  // a NaN score stays NaN (as SDPA gives it)
  // Round to nearest by the 1.5 * 2^23 trick (|t| < 2^22).
  const vf16 n = (t + 12582912.0f) - 12582912.0f;
  const vf16 f = t - n;
  constexpr float ln2 = 0.6931471805599453f;
  constexpr float c[7] = {1.0f,
                          ln2,
                          ln2 * ln2 / 2,
                          ln2 * ln2 * ln2 / 6,
                          ln2 * ln2 * ln2 * ln2 / 24,
                          ln2 * ln2 * ln2 * ln2 * ln2 / 120,
                          ln2 * ln2 * ln2 * ln2 * ln2 * ln2 / 720};
  vf16 p = splat(c[Degree]);
  for (int k = Degree - 1; k >= 0; --k) p = p * f + c[k];
  const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
  return p * reinterpret_cast<const vf16&>(bits);
}

template <typename scalar_t>
constexpr int exp_degree() {
  return std::is_same_v<scalar_t, float> ? 6 : 4;
}

inline float exp2_scalar(float t) { return fast_exp2<6>(splat(t))[0]; }

inline vf16 load(const float* x) { return *reinterpret_cast<const vf16*>(x); }

// The first n lanes of 16 floats from x, the rest zero.
inline vf16 load_head(const float* x, int64_t n) {
  float tmp[kLanes] = {};
  std::memcpy(tmp, x, n * sizeof(float));
  return load(tmp);
}

inline float row_max(const float* x, int64_t n) {
  vf16 m = splat(-std::numeric_limits<float>::infinity());
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    const vf16 v = load(x + c);
    m = v > m ? v : m;
  }
  float out = -std::numeric_limits<float>::infinity();
  for (; c < n; ++c) out = std::max(out, x[c]);
  for (int64_t j = 0; j < kLanes; ++j) out = std::max(out, m[j]);
  return out;
}

// Stores 16 probabilities in the operand dtype (bfloat16: round to nearest even).
template <typename scalar_t>
inline void store16(scalar_t* dst, vf16 p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    *reinterpret_cast<vf16*>(dst) = p;
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(p)));
#else
    vu16 u = reinterpret_cast<const vu16&>(p);
    u += 0x7FFFu + ((u >> 16) & 1u);
    *reinterpret_cast<vh16*>(dst) = __builtin_convertvector(u >> 16, vh16);
#endif
  } else {
    for (int64_t j = 0; j < kLanes; ++j) dst[j] = static_cast<scalar_t>(p[j]);
  }
}

// Scores are turned into base-2 exponents: t = s * k - m with k = scale * log2(e) and m the row's
// running maximum of s * k. p[c] = 2^t for c < nvalid, 0 for nvalid <= c < ncols (ncols a multiple
// of 16); returns the sum of p.
template <typename scalar_t>
inline float exp_row(const float* s, scalar_t* p, int64_t nvalid, int64_t ncols, float k, float m) {
  constexpr int degree = exp_degree<scalar_t>();
  vf16 sum = {};
  int64_t c = 0;
  for (; c + kLanes <= nvalid; c += kLanes) {
    const vf16 e = fast_exp2<degree>(load(s + c) * k - m);
    sum += e;
    store16(p + c, e);
  }
  if (c < nvalid) {
    const int64_t rest = nvalid - c;
    vf16 e = fast_exp2<degree>(load_head(s + c, rest) * k - m);
    const vi16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    e = lane < static_cast<int32_t>(rest) ? e : splat(0.0f);
    sum += e;
    store16(p + c, e);
    c += kLanes;
  }
  for (; c < ncols; c += kLanes) store16(p + c, splat(0.0f));
  float out = 0.0f;
  for (int64_t j = 0; j < kLanes; ++j) out += sum[j];
  return out;
}

// Row stride of the score and probability buffers: a chunk's columns rounded up to whole vectors,
// since exp_row writes 16 at a time.
inline int64_t row_stride(int64_t bs) {
  const int64_t cols = std::max<int64_t>(1, kChunkKeys / bs) * bs;
  return (cols + kLanes - 1) / kLanes * kLanes;
}

// End of the run of consecutive block indices that starts at sel[j] (exclusive, at most n).
inline int64_t run_end(const int32_t* sel, int64_t j, int64_t n) {
  int64_t e = j + 1;
  while (e < n && sel[e] == sel[e - 1] + 1) ++e;
  return e;
}

struct Item {
  int64_t b, hk, qb, h0, nh, cost;
};

// The layout tensors as the kernel reads them: batch b of the inputs maps to layout batch 0 when the
// layout has one (it broadcasts), any strides (stride 0 included), rows of kv_indices contiguous.
struct LayoutView {
  const int32_t* num;
  const int32_t* idx;
  int64_t batch, lsb, lsh, lsq, isb, ish, isq;

  LayoutView(const at::Tensor& num_t, const at::Tensor& idx_t)
      : num(num_t.data_ptr<int32_t>()),
        idx(idx_t.data_ptr<int32_t>()),
        batch(num_t.size(0)),
        lsb(num_t.stride(0)),
        lsh(num_t.stride(1)),
        lsq(num_t.stride(2)),
        isb(idx_t.stride(0)),
        ish(idx_t.stride(1)),
        isq(idx_t.stride(2)) {}
  int64_t lb(int64_t b) const { return batch == 1 ? 0 : b; }
  // Number of key blocks query block q of head h selects, and their indices.
  int64_t count(int64_t b, int64_t h, int64_t q) const { return num[lb(b) * lsb + h * lsh + q * lsq]; }
  const int32_t* row(int64_t b, int64_t h, int64_t q) const { return idx + lb(b) * isb + h * ish + q * isq; }
};

// One thread's buffers for run_item: the folded query rows, scores, probabilities, output accumulator
// and each row's running max and sum.
template <typename scalar_t>
struct Scratch {
  std::vector<scalar_t> q, p;
  std::vector<float> s, acc, mx, sm;
  Scratch(int64_t rows, int64_t D, int64_t ldc)
      : q(rows * D), p(rows * ldc), s(rows * ldc), acc(rows * D), mx(rows), sm(rows) {}
};

template <typename scalar_t>
struct Operands {
  bool packed;
  int64_t D, bs, Skp, Kcols;
  // Kt[b, hk]: the QK right-hand side for all keys, [D, Kcols] (packed: per column chunk).
  std::vector<scalar_t> kb;
  // Vb[b, hk, dc]: the PV right-hand side for all keys and one column chunk, [Skp, width(dc)].
  std::vector<scalar_t> vb;
  int64_t Hkv;
  std::vector<int64_t> dc_start, dc_width;

  // Scores S[:, col:] (+)= Q Kt[b, hk][:, key0 : key0 + n], in as few micro-kernel calls as the
  // packed layout allows (one per column chunk it touches; plain: one).
  void scores(int64_t b, int64_t hk, int64_t key0, int64_t n, const scalar_t* q, int64_t R, float* s,
              int64_t ldc) const {
    const scalar_t* base = kb.data() + (b * Hkv + hk) * D * Kcols;
    if (!packed) {
      at::native::cpublas::brgemm(R, n, D, D, Kcols, ldc, false, q, base + key0, s, false);
      return;
    }
    for (int64_t k0 = key0; k0 < key0 + n;) {
      const int64_t chunk = k0 / kPackWidth, o = k0 - chunk * kPackWidth;
      const int64_t w = std::min(kPackWidth - o, key0 + n - k0);
      at::native::cpublas::brgemm(R, w, D, D, kPackWidth, ldc, false, q, base + chunk * kPackWidth * D + o * 2,
                                  s + (k0 - key0), true);
      k0 += w;
    }
  }
  const scalar_t* v_chunk(int64_t b, int64_t hk, int64_t dc) const {
    return vb.data() + (b * Hkv + hk) * Skp * D + Skp * dc_start[dc];
  }
};

// Keys per slice of the operand preparation's work.
constexpr int64_t kPrepKeys = 1024;

// One packed column chunk of K^T ([D / 2, kPackWidth, 2], 16-bit types) from `rows` rows of K
// (row stride `ld`); columns past `rows` are zero.
template <typename scalar_t>
void pack_k_direct(const scalar_t* k, int64_t ld, int64_t rows, int64_t D, scalar_t* out) {
  static_assert(sizeof(scalar_t) == 2, "16-bit types only");
  const int64_t pairs = D / 2;
  auto* o = reinterpret_cast<uint32_t*>(out);
  for (int64_t p = 0; p < pairs; ++p) {
    uint32_t* orow = o + p * kPackWidth;
    for (int64_t n = 0; n < rows; ++n) std::memcpy(orow + n, k + n * ld + 2 * p, 4);
    for (int64_t n = rows; n < kPackWidth; ++n) orow[n] = 0;
  }
}

// Whether pack_k_direct writes what cpublas::pack writes for this dtype (asked once per process).
template <typename scalar_t>
bool same_as_pack(at::ScalarType dt) {
  if constexpr (sizeof(scalar_t) != 2) {
    return false;
  } else {
    static const bool same = [dt] {
      constexpr int64_t D = 64;
      std::vector<scalar_t> k(kPackWidth * D), kt(D * kPackWidth), a(D * kPackWidth), b(D * kPackWidth);
      for (int64_t i = 0; i < kPackWidth * D; ++i) k[i] = static_cast<scalar_t>(static_cast<float>((i * 7919) % 251) - 125);
      for (int64_t n = 0; n < kPackWidth; ++n)
        for (int64_t d = 0; d < D; ++d) kt[d * kPackWidth + n] = k[n * D + d];
      at::native::cpublas::pack(D, kPackWidth, kPackWidth, kPackWidth, dt, dt, kt.data(), a.data());
      pack_k_direct(k.data(), D, kPackWidth, D, b.data());
      return std::memcmp(a.data(), b.data(), a.size() * sizeof(scalar_t)) == 0;
    }();
    return same;
  }
}

// Fills the right-hand operands from k / v (strided), zero-padding keys past Sk.
template <typename scalar_t>
void prepare_operands(const at::Tensor& k, const at::Tensor& v, int64_t bs, bool packed, Operands<scalar_t>& ops) {
  const int64_t B = k.size(0), Hkv = k.size(1), Sk = k.size(2), D = k.size(3);
  ops.packed = packed;
  ops.D = D;
  ops.bs = bs;
  ops.Hkv = Hkv;
  ops.Skp = (Sk + bs - 1) / bs * bs;
  for (int64_t c = 0; c < D; c += kPackWidth) {
    ops.dc_start.push_back(c);
    ops.dc_width.push_back(std::min(kPackWidth, D - c));
  }
  ops.Kcols = packed ? (ops.Skp + kPackWidth - 1) / kPackWidth * kPackWidth : ops.Skp;
  ops.kb.assign(B * Hkv * D * ops.Kcols, scalar_t(0));
  ops.vb.resize(B * Hkv * ops.Skp * D);
  const auto* kp = k.data_ptr<scalar_t>();
  const auto* vp = v.data_ptr<scalar_t>();
  const int64_t ksb = k.stride(0), ksh = k.stride(1), kss = k.stride(2);
  const int64_t vsb = v.stride(0), vsh = v.stride(1), vss = v.stride(2);
  const auto dt = k.scalar_type();
  const int64_t Skp = ops.Skp;

  // Work in slices of kPrepKeys keys per (batch, KV head), so both threads share even one head.
  // K^T per KV head, [D, Kcols]: plain, or packed in column chunks of kPackWidth (the widest packed
  // operand the micro-kernel takes), each chunk [D / 2, kPackWidth, 2]: for key n and dimension pair
  // p the two 16-bit values (K[n, 2p], K[n, 2p + 1]), i.e. a transpose of K's rows read as 32-bit
  // pairs. That is the layout cpublas::pack writes (packed is only chosen where same_as_pack says so).
  // V per KV head and column chunk of at most kPackWidth, [Skp, width], packed as [Skp / 2, width, 2].
  const int64_t Kcols = ops.Kcols;
  const int64_t nDc = static_cast<int64_t>(ops.dc_start.size());
  const int64_t slices = (Skp + kPrepKeys - 1) / kPrepKeys;
  at::parallel_for(0, B * Hkv * slices, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> tmp;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t slice = i % slices, hk = (i / slices) % Hkv, b = i / (slices * Hkv);
      const int64_t s_begin = slice * kPrepKeys, s_end = std::min(Skp, s_begin + kPrepKeys);
      const scalar_t* ksrc = kp + b * ksb + hk * ksh;
      scalar_t* kdst = ops.kb.data() + (b * Hkv + hk) * D * Kcols;
      if (!packed) {
        for (int64_t s0 = s_begin; s0 < std::min(Sk, s_end); s0 += 16)
          for (int64_t d = 0; d < D; ++d)
            for (int64_t s1 = s0; s1 < std::min(Sk, s0 + 16); ++s1) kdst[d * Kcols + s1] = ksrc[s1 * kss + d];
      } else if constexpr (sizeof(scalar_t) == 2) {
        for (int64_t c0 = s_begin; c0 < s_end; c0 += kPackWidth) {
          const int64_t rows = std::max<int64_t>(0, std::min(Sk, c0 + kPackWidth) - c0);
          pack_k_direct(ksrc + c0 * kss, kss, rows, D, kdst + c0 * D);
        }
      }
      const scalar_t* vsrc = vp + b * vsb + hk * vsh;
      for (int64_t dc = 0; dc < nDc; ++dc) {
        const int64_t c0 = ops.dc_start[dc], w = ops.dc_width[dc], n = s_end - s_begin;
        scalar_t* vdst = ops.vb.data() + (b * Hkv + hk) * Skp * D + Skp * c0 + s_begin * w;
        scalar_t* t = packed ? (tmp.resize(n * w), tmp.data()) : vdst;
        for (int64_t s1 = s_begin; s1 < s_end; ++s1) {
          if (s1 < Sk) {
            std::memcpy(t + (s1 - s_begin) * w, vsrc + s1 * vss + c0, w * sizeof(scalar_t));
          } else {
            std::fill(t + (s1 - s_begin) * w, t + (s1 - s_begin + 1) * w, scalar_t(0));
          }
        }
        if (packed) at::native::cpublas::pack(n, w, w, w, dt, dt, t, vdst);
      }
    }
  });
}

// Writes the output rows of one item; an item that selects no block writes zeros.
template <typename scalar_t>
void run_item(const Item& it, const at::Tensor& q, at::Tensor& out, const LayoutView& layout, int64_t offset,
              float scale, const Operands<scalar_t>& ops, Scratch<scalar_t>& buf) {
  const int64_t D = ops.D, bs = ops.bs, Sq = q.size(2);
  const int64_t q0 = it.qb * bs;
  const int64_t rb = std::min(bs, Sq - q0);
  const int64_t R = it.nh * rb;
  const int64_t nsel = layout.count(it.b, it.h0, it.qb);
  const int32_t* sel = layout.row(it.b, it.h0, it.qb);
  std::vector<scalar_t>& qbuf = buf.q;
  std::vector<scalar_t>& pbuf = buf.p;
  std::vector<float>&sbuf = buf.s, &acc = buf.acc, &mx = buf.mx, &sm = buf.sm;
  const bool packed = ops.packed;
  const float k2 = scale * 1.4426950408889634f;  // scores to base-2 exponents

  // Query rows of the folded heads, contiguous.
  const auto* qp = q.data_ptr<scalar_t>();
  for (int64_t hi = 0; hi < it.nh; ++hi) {
    const scalar_t* src = qp + it.b * q.stride(0) + (it.h0 + hi) * q.stride(1) + q0 * q.stride(2);
    for (int64_t r = 0; r < rb; ++r)
      std::memcpy(qbuf.data() + (hi * rb + r) * D, src + r * q.stride(2), D * sizeof(scalar_t));
  }
  std::fill(mx.begin(), mx.begin() + R, -std::numeric_limits<float>::infinity());
  std::fill(sm.begin(), sm.begin() + R, 0.0f);
  std::fill(acc.begin(), acc.begin() + R * D, 0.0f);

  const int64_t chunk_blocks = std::max<int64_t>(1, kChunkKeys / bs);
  const int64_t ldc = row_stride(bs);
  for (int64_t c0 = 0; c0 < nsel; c0 += chunk_blocks) {
    const int64_t nb = std::min(chunk_blocks, nsel - c0);
    const int64_t ncols = nb * bs;
    // The chunk's keys lie after the last row's position: nothing here is visible.
    if (static_cast<int64_t>(sel[c0]) * bs > q0 + rb - 1 + offset) break;
    // Scores for each run of consecutive key blocks in one call.
    for (int64_t j = 0; j < nb;) {
      const int64_t j1 = run_end(sel + c0, j, nb);
      const int64_t key0 = static_cast<int64_t>(sel[c0 + j]) * bs;
      ops.scores(it.b, it.hk, key0, (j1 - j) * bs, qbuf.data(), R, sbuf.data() + j * bs, ldc);
      j = j1;
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t pos = q0 + (r % rb) + offset;
      // Keys ascend, so the visible ones are a prefix of the chunk's columns.
      int64_t nvalid = 0;
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t first = static_cast<int64_t>(sel[c0 + j]) * bs;
        if (first + bs - 1 <= pos) {
          nvalid += bs;
        } else {
          nvalid += std::max<int64_t>(0, pos - first + 1);
          break;
        }
      }
      scalar_t* prow = pbuf.data() + r * ldc;
      if (nvalid == 0) {
        std::memset(static_cast<void*>(prow), 0, ncols * sizeof(scalar_t));
        continue;
      }
      const float* srow = sbuf.data() + r * ldc;
      const float m_new = std::max(mx[r], row_max(srow, nvalid) * k2);
      const float sum = exp_row(srow, prow, nvalid, ncols, k2, m_new);
      const float alpha = mx[r] == -std::numeric_limits<float>::infinity() ? 0.0f : exp2_scalar(mx[r] - m_new);
      sm[r] = sm[r] * alpha + sum;
      mx[r] = m_new;
      if (alpha != 1.0f) {
        float* a = acc.data() + r * D;
        for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
      }
    }
    // P V over each run of consecutive key blocks.
    for (int64_t j = 0; j < nb;) {
      const int64_t j1 = run_end(sel + c0, j, nb);
      const int64_t keys = (j1 - j) * bs, key0 = static_cast<int64_t>(sel[c0 + j]) * bs;
      for (size_t dc = 0; dc < ops.dc_start.size(); ++dc) {
        const int64_t w = ops.dc_width[dc];
        const scalar_t* vb = ops.v_chunk(it.b, it.hk, dc) + key0 * w;
        at::native::cpublas::brgemm(R, w, keys, ldc, w, D, true, pbuf.data() + j * bs, vb,
                                    acc.data() + ops.dc_start[dc], packed);
      }
      j = j1;
    }
  }

  auto* op = out.data_ptr<scalar_t>();
  for (int64_t hi = 0; hi < it.nh; ++hi) {
    scalar_t* dst = op + it.b * out.stride(0) + (it.h0 + hi) * out.stride(1) + q0 * out.stride(2);
    for (int64_t r = 0; r < rb; ++r) {
      const int64_t rr = hi * rb + r;
      const float inv = sm[rr] > 0.0f ? 1.0f / sm[rr] : 0.0f;
      const float* a = acc.data() + rr * D;
      scalar_t* o = dst + r * out.stride(2);
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(a[d] * inv);
    }
  }
}

// The work items: one per (batch, KV head, query block), with the group's query heads folded
// when they select the same blocks, else one per query head. Rows that select nothing are items too
// (they write the zeros), so the output needs no fill first.
std::vector<Item> make_items(int64_t B, int64_t Hq, int64_t Hkv, int64_t nQ, const LayoutView& layout) {
  const int64_t G = Hq / Hkv;
  std::vector<Item> items;
  items.reserve(B * Hkv * nQ);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t hk = 0; hk < Hkv; ++hk) {
      for (int64_t qb = 0; qb < nQ; ++qb) {
        const int64_t h0 = hk * G;
        const int64_t n0 = layout.count(b, h0, qb);
        const int32_t* s0 = layout.row(b, h0, qb);
        bool same = true;
        for (int64_t h = h0 + 1; h < h0 + G && same; ++h)
          same = layout.count(b, h, qb) == n0 && std::equal(s0, s0 + n0, layout.row(b, h, qb));
        if (same) {
          items.push_back({b, hk, qb, h0, G, n0 * G});
          continue;
        }
        for (int64_t h = h0; h < h0 + G; ++h) items.push_back({b, hk, qb, h, 1, layout.count(b, h, qb)});
      }
    }
  }
  // Largest first, taken in turn by whichever thread is free.
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  return items;
}

// Packed (VNNI) operands where the CPU's micro-kernels take them: 16-bit types the CPU packs (AMX:
// bfloat16; AMX-FP16: float16), head dims whose V column chunks are 16, 32, 48 or 64 wide (the widths
// the packing accepts), even block sizes (pairs of keys), and the layout the offsets here assume
// (checked once against cpublas::pack). Elsewhere plain operands.
bool uses_packed(at::ScalarType dt, int64_t D, int64_t bs) {
  if (D % 16 != 0 || bs % 2 != 0) return false;
  switch (dt) {
    case at::kBFloat16:
      return at::native::cpublas::could_pack(dt) && same_as_pack<at::BFloat16>(dt);
    case at::kHalf:
      return at::native::cpublas::could_pack(dt) && same_as_pack<at::Half>(dt);
    default:
      return false;
  }
}

template <typename scalar_t>
at::Tensor attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& num_t,
                          const at::Tensor& idx_t, int64_t bs, double scale_d) {
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2);
  const int64_t nQ = (Sq + bs - 1) / bs;
  if (B == 0 || Sq == 0 || Sk == 0) return at::zeros({B, Hq, Sq, D}, q.options());
  auto out = at::empty({B, Hq, Sq, D}, q.options());  // every row belongs to an item (make_items)

  const bool packed = uses_packed(q.scalar_type(), D, bs);
  Operands<scalar_t> ops;
  prepare_operands<scalar_t>(k, v, bs, packed, ops);

  const LayoutView layout(num_t, idx_t);
  const auto items = make_items(B, Hq, Hkv, nQ, layout);
  const int64_t offset = Sk - Sq;
  const float scale = static_cast<float>(scale_d);
  const int64_t G = Hq / Hkv;
  const int64_t rmax = G * bs;
  const int64_t ldc = row_stride(bs);

  // Every thread that parallel_for starts takes items, largest first, until none is left (items
  // differ in cost: a dense head's last query block sees its whole prefix).
  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  at::parallel_for(0, n_items, 1, [&](int64_t, int64_t) {
    Scratch<scalar_t> buf(rmax, D, ldc);
    for (int64_t i = next.fetch_add(1); i < n_items; i = next.fetch_add(1))
      run_item<scalar_t>(items[i], q, out, layout, offset, scale, ops, buf);
    if (packed) at::native::cpublas::brgemm_release();
  });
  return out;
}

// The layout's values, which the kernel trusts for its reads: counts within [0, maxK], indices of the
// counted entries ascending and within [0, nK). O(B * H * nQ * maxK), small beside the attention.
void check_layout(const at::Tensor& num_t, const at::Tensor& idx_t, int64_t B, int64_t nQ, int64_t nK) {
  const int64_t lb = num_t.size(0), H = num_t.size(1), maxk = idx_t.size(3);
  TORCH_CHECK(lb == 1 || lb == B, "layout batch must be 1 or the batch size");
  TORCH_CHECK(num_t.size(2) == nQ, "layout has ", num_t.size(2), " query blocks, the inputs ", nQ);
  TORCH_CHECK(idx_t.size(0) == lb && idx_t.size(1) == H && idx_t.size(2) == nQ, "kv_indices and kv_num_blocks disagree");
  const LayoutView layout(num_t, idx_t);
  for (int64_t b = 0; b < lb; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t r = 0; r < nQ; ++r) {
        const int64_t n = layout.count(b, h, r);
        TORCH_CHECK(n >= 0 && n <= maxk, "kv_num_blocks entry ", n, " outside [0, ", maxk, "]");
        const int32_t* row = layout.row(b, h, r);
        for (int64_t j = 0; j < n; ++j) {
          TORCH_CHECK(row[j] >= 0 && row[j] < nK, "kv_indices entry ", row[j], " outside [0, ", nK, ")");
          TORCH_CHECK(j == 0 || row[j] > row[j - 1], "kv_indices rows must be strictly ascending");
        }
      }
}

at::Tensor block_sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices, int64_t block_size,
                                  double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be [B, H, S, D]");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(3) == k.size(3), "q, k, v shapes disagree");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "the head dimension must be contiguous");
  TORCH_CHECK(block_size > 0, "block_size must be positive");
  TORCH_CHECK(kv_num_blocks.scalar_type() == at::kInt && kv_indices.scalar_type() == at::kInt, "layout must be int32");
  TORCH_CHECK(kv_num_blocks.dim() == 3 && kv_indices.dim() == 4, "layout shapes");
  TORCH_CHECK(kv_num_blocks.size(1) == q.size(1) && kv_indices.size(1) == q.size(1), "layout heads != query heads");
  TORCH_CHECK(kv_indices.stride(3) == 1, "kv_indices rows must be contiguous");
  TORCH_CHECK(kv_num_blocks.device().is_cpu() && kv_indices.device().is_cpu(), "layout must be on the CPU");
  check_layout(kv_num_blocks, kv_indices, q.size(0), (q.size(2) + block_size - 1) / block_size,
               (k.size(2) + block_size - 1) / block_size);
  switch (q.scalar_type()) {
    case at::kFloat:
      return attention_impl<float>(q, k, v, kv_num_blocks, kv_indices, block_size, scale);
    case at::kBFloat16:
      return attention_impl<at::BFloat16>(q, k, v, kv_num_blocks, kv_indices, block_size, scale);
    case at::kHalf:
      return attention_impl<at::Half>(q, k, v, kv_num_blocks, kv_indices, block_size, scale);
    default:
      TORCH_CHECK(false, "dtype must be float32, bfloat16 or float16");
  }
}

// Whether inputs of `like`'s dtype with this head dim and block size run on packed operands.
bool packs(const at::Tensor& like, int64_t head_dim, int64_t block_size) {
  return uses_packed(like.scalar_type(), head_dim, block_size);
}

}  // namespace

TORCH_LIBRARY(moa_compress_cpu, m) {
  m.def("packs(Tensor like, int head_dim, int block_size) -> bool");
  m.impl("packs", c10::DispatchKey::CPU, TORCH_FN(packs));
  m.def(
      "block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices, "
      "int block_size, float scale) -> Tensor");
  m.impl("block_sparse_attention", c10::DispatchKey::CPU, TORCH_FN(block_sparse_attention));
}
