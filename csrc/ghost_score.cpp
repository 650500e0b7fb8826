// CPU implementation of the ghost score (see ghost_score.h for shapes and formula).
//
// Work split: samples are grouped into small blocks (about kRowsPerBlock rows (i, v) of h);
// OpenMP runs blocks in parallel. Inside a block, G_w is walked two rows at a time and each
// pair is dotted with the block's h rows four at a time (a 2×4 register tile, inner loop over
// the contiguous d_in); each product G_w[k, o]·h_{i,v} is weighted by δ_{i,v,o} and
// accumulated in double. G_w is streamed once per block rather than once per sample, the h
// rows of a block stay in L1/L2, and no d_out×d_in per-sample gradient is ever formed.
#include "ghost_score.h"

#include <algorithm>
#include <vector>

#ifdef FFENGINE_HAVE_OPENMP
#include <omp.h>
#endif

namespace ffengine {
namespace {

constexpr int64_t kRowsPerBlock = 16;

#if defined(__GNUC__)
#define FFE_INLINE inline __attribute__((always_inline))
#else
#define FFE_INLINE inline
#endif

// Σ_j a[j] b[j] in T (the inner, length-d_in loop; vectorized with partial sums).
template <typename T>
FFE_INLINE T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

// Same, accumulated in double (used for the cheap V×V Gram matrices of sqnorm).
template <typename T>
FFE_INLINE double dot_f64(const T* a, const T* b, int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += static_cast<double>(a[j]) * static_cast<double>(b[j]);
  return s;
}

// Dot products of G rows g0, g1 with h rows x0..x3 (a 2×4 tile): every loaded element
// serves several products.
template <typename T>
FFE_INLINE void dot_2x4(const T* g0, const T* g1, const T* x0, const T* x1, const T* x2,
                        const T* x3, int64_t n, T* out0, T* out1) {
  T a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
  for (int64_t j = 0; j < n; ++j) {
    const T u = g0[j], w = g1[j];
    const T y0 = x0[j], y1 = x1[j], y2 = x2[j], y3 = x3[j];
    a0 += u * y0;
    a1 += u * y1;
    a2 += u * y2;
    a3 += u * y3;
    b0 += w * y0;
    b1 += w * y1;
    b2 += w * y2;
    b3 += w * y3;
  }
  out0[0] = a0, out0[1] = a1, out0[2] = a2, out0[3] = a3;
  out1[0] = b0, out1[1] = b1, out1[2] = b2, out1[3] = b3;
}

// One G row g with h rows x0..x3.
template <typename T>
FFE_INLINE void dot_1x4(const T* g, const T* x0, const T* x1, const T* x2, const T* x3,
                        int64_t n, T* out) {
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t j = 0; j < n; ++j) {
    const T gj = g[j];
    s0 += gj * x0[j];
    s1 += gj * x1[j];
    s2 += gj * x2[j];
    s3 += gj * x3[j];
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

// acc[(r - r0) * K + k] += Σ_o δ_{r,o} (G_w[k, o] · h_r) for the rows r = (i, v) of one block.
// The hot loop: a small GEMM (rows × d_in)·(d_in × K d_out) fused with the δ contraction.
template <typename T>
FFE_INLINE void block_dots_impl(const T* h, const T* delta, const T* G_w, const GhostShape& s,
                                int64_t r0, int64_t r1, double* acc) {
  const int64_t d_in = s.d_in, d_out = s.d_out, K = s.K;
  auto add = [&](int64_t r, int64_t k, int64_t o, T p) {
    acc[(r - r0) * K + k] += static_cast<double>(delta[r * d_out + o]) * static_cast<double>(p);
  };
  for (int64_t k = 0; k < K; ++k) {
    const T* Gk = G_w + k * d_out * d_in;
    int64_t o = 0;
    for (; o + 2 <= d_out; o += 2) {
      const T* g0 = Gk + o * d_in;
      const T* g1 = g0 + d_in;
      int64_t r = r0;
      for (; r + 4 <= r1; r += 4) {
        T p0[4], p1[4];
        const T* x = h + r * d_in;
        dot_2x4(g0, g1, x, x + d_in, x + 2 * d_in, x + 3 * d_in, d_in, p0, p1);
        for (int64_t t = 0; t < 4; ++t) {
          add(r + t, k, o, p0[t]);
          add(r + t, k, o + 1, p1[t]);
        }
      }
      for (; r < r1; ++r) {
        add(r, k, o, dot(g0, h + r * d_in, d_in));
        add(r, k, o + 1, dot(g1, h + r * d_in, d_in));
      }
    }
    for (; o < d_out; ++o) {
      const T* g = Gk + o * d_in;
      int64_t r = r0;
      for (; r + 4 <= r1; r += 4) {
        T p[4];
        const T* x = h + r * d_in;
        dot_1x4(g, x, x + d_in, x + 2 * d_in, x + 3 * d_in, d_in, p);
        for (int64_t t = 0; t < 4; ++t) add(r + t, k, o, p[t]);
      }
      for (; r < r1; ++r) add(r, k, o, dot(g, h + r * d_in, d_in));
    }
  }
}

// The hot loop is compiled for several x86-64 levels and picked at load time (GCC
// target_clones, via ifunc), so the build stays portable (no -march=native) yet uses
// AVX2/FMA or AVX-512 where the CPU has them.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && \
    defined(__linux__)
#define FFE_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FFE_MULTIVERSION
#endif

FFE_MULTIVERSION void block_dots(const float* h, const float* delta, const float* G_w,
                                 const GhostShape& s, int64_t r0, int64_t r1, double* acc) {
  block_dots_impl(h, delta, G_w, s, r0, r1, acc);
}

FFE_MULTIVERSION void block_dots(const double* h, const double* delta, const double* G_w,
                                 const GhostShape& s, int64_t r0, int64_t r1, double* acc) {
  block_dots_impl(h, delta, G_w, s, r0, r1, acc);
}

// Scores samples [i0, i1). `acc` is scratch of size (i1 - i0) * V * K.
template <typename T>
void score_block(const T* h, const T* delta, const T* G_w, const T* G_b, const GhostShape& s,
                 int64_t i0, int64_t i1, T* dots, T* sqnorm, std::vector<double>& acc,
                 std::vector<double>& delta_sum) {
  const int64_t V = s.V, d_in = s.d_in, d_out = s.d_out, K = s.K;
  const int64_t r0 = i0 * V, r1 = i1 * V, nr = r1 - r0;
  acc.assign(static_cast<size_t>(nr * K), 0.0);

  block_dots(h, delta, G_w, s, r0, r1, acc.data());

  delta_sum.assign(static_cast<size_t>(d_out), 0.0);
  for (int64_t i = i0; i < i1; ++i) {
    const T* hi = h + i * V * d_in;
    const T* di = delta + i * V * d_out;

    // sqnorm: Σ_{v,v'} (δ_v·δ_v') (h_v·h_v'), using symmetry; bias adds ‖Σ_v δ_v‖² = Σ_{v,v'} δ_v·δ_v'.
    double sq = 0.0, bias_sq = 0.0;
    for (int64_t v = 0; v < V; ++v) {
      for (int64_t w = v; w < V; ++w) {
        const double dd = dot_f64(di + v * d_out, di + w * d_out, d_out);
        const double hh = dot_f64(hi + v * d_in, hi + w * d_in, d_in);
        const double mult = (w == v) ? 1.0 : 2.0;
        sq += mult * dd * hh;
        bias_sq += mult * dd;
      }
    }

    if (G_b != nullptr) {
      std::fill(delta_sum.begin(), delta_sum.end(), 0.0);
      for (int64_t v = 0; v < V; ++v) {
        const T* dv = di + v * d_out;
        for (int64_t o = 0; o < d_out; ++o) delta_sum[o] += static_cast<double>(dv[o]);
      }
      sq += bias_sq;
    }

    for (int64_t k = 0; k < K; ++k) {
      double total = 0.0;
      for (int64_t v = 0; v < V; ++v) total += acc[(i * V + v - r0) * K + k];
      if (G_b != nullptr) {
        const T* gb = G_b + k * d_out;
        for (int64_t o = 0; o < d_out; ++o) total += static_cast<double>(gb[o]) * delta_sum[o];
      }
      dots[i * K + k] = static_cast<T>(total);
    }
    // Mathematically ‖g_i‖² ≥ 0; rounding with V > 1 must not produce a negative value
    // (the score takes its square root).
    sqnorm[i] = static_cast<T>(std::max(sq, 0.0));
  }
}

}  // namespace

template <typename T>
void ghost_score_cpu(const T* h, const T* delta, const T* G_w, const T* G_b,
                     const GhostShape& shape, T* dots, T* sqnorm, int num_threads) {
  const int64_t B = shape.B;
  if (B == 0) return;
  const int64_t samples_per_block = std::max<int64_t>(1, kRowsPerBlock / std::max<int64_t>(1, shape.V));
  const int64_t n_blocks = (B + samples_per_block - 1) / samples_per_block;

#ifdef FFENGINE_HAVE_OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(threads)
#else
  (void)num_threads;
#endif
  {
    std::vector<double> acc, delta_sum;
#ifdef FFENGINE_HAVE_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t i0 = blk * samples_per_block;
      const int64_t i1 = std::min(B, i0 + samples_per_block);
      score_block(h, delta, G_w, G_b, shape, i0, i1, dots, sqnorm, acc, delta_sum);
    }
  }
}

template void ghost_score_cpu<float>(const float*, const float*, const float*, const float*,
                                     const GhostShape&, float*, float*, int);
template void ghost_score_cpu<double>(const double*, const double*, const double*,
                                      const double*, const GhostShape&, double*, double*, int);

bool has_openmp() {
#ifdef FFENGINE_HAVE_OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace ffengine
