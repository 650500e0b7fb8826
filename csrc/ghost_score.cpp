// CPU implementation of the ghost score (see ghost_score.h for shapes and formula).
//
// The hot part is Σ_o δ_{r,o} (G_w[k, o] · h_r) for every row r = (i, v) of h: a GEMM
// (rows × d_in)·(d_in × K d_out) whose result is contracted with δ at once, so the
// (rows × K d_out) product is never written out (the torch composite writes it, then
// multiplies by δ and sums). G_w is first packed into panels of kPanel outputs, each stored
// feature-major, so that one vector load reads kPanel outputs of one input feature; a
// kTileRows × kPanel register tile then accumulates over d_in (the GEMM micro-kernel shape of
// BLIS and oneDNN), and the finished tile is weighted by δ and summed over its outputs in
// double. Rows are grouped into blocks of about kRowsPerBlock (their h rows stay in L2 while
// every G panel passes over them); OpenMP runs blocks in parallel. No d_out×d_in per-sample
// gradient is ever formed.
#include "ghost_score.h"

#include <algorithm>
#include <vector>

#ifdef FFENGINE_HAVE_OPENMP
#include <omp.h>
#endif

namespace ffengine {
namespace {

constexpr int64_t kRowsPerBlock = 96;
// Rows per register tile: with kPanel floats (two AVX2 vectors) per row the float tile holds
// ten accumulators, plus two G vectors and one broadcast h value: 13 of AVX2's 16 vector
// registers. Six rows (twelve accumulators) measured slower: GCC spilled one to the stack.
constexpr int kTileRows = 5;

// Outputs per G panel: 64 bytes, two AVX2 vectors or one AVX-512 vector of float.
template <typename T>
constexpr int kPanel = static_cast<int>(64 / sizeof(T));

#if defined(__GNUC__)
#define FFE_INLINE inline __attribute__((always_inline))
#else
#define FFE_INLINE inline
#endif

// Same, accumulated in double (used for the cheap V×V Gram matrices of sqnorm).
template <typename T>
FFE_INLINE double dot_f64(const T* a, const T* b, int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += static_cast<double>(a[j]) * static_cast<double>(b[j]);
  return s;
}

int64_t n_panels(const GhostShape& s, int64_t panel) { return (s.d_out + panel - 1) / panel; }

// Panel p of instance k: Gp[((k·P + p)·d_in + j)·NR + c] = G_w[k, p·NR + c, j], zero for
// outputs past d_out (they meet zero weights, see tile_dots).
template <typename T>
void pack_panel(const T* G_w, const GhostShape& s, int64_t k, int64_t p, T* Gp) {
  constexpr int NR = kPanel<T>;
  const int64_t d_in = s.d_in, P = n_panels(s, NR), o0 = p * NR;
  const int64_t nc = std::min<int64_t>(NR, s.d_out - o0);
  T* dst = Gp + (k * P + p) * d_in * NR;
  for (int64_t c = 0; c < NR; ++c) {
    if (c < nc) {
      const T* src = G_w + (k * s.d_out + o0 + c) * d_in;
      for (int64_t j = 0; j < d_in; ++j) dst[j * NR + c] = src[j];
    } else {
      for (int64_t j = 0; j < d_in; ++j) dst[j * NR + c] = T(0);
    }
  }
}

// For MR rows of h starting at x (row stride d_in) and one packed panel gp:
// out[r] += Σ_{c < nc} δ[r, c] · Σ_j x[r, j] gp[j, c], the inner sum in a register tile.
template <typename T, int MR>
FFE_INLINE void tile_dots(const T* x, const T* delta, int64_t d_in, int64_t d_out,
                          const T* gp, int64_t nc, double* out, int64_t out_stride) {
  constexpr int NR = kPanel<T>;
  T c[MR][NR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma omp simd
    for (int t = 0; t < NR; ++t) c[r][t] = T(0);
  for (int64_t j = 0; j < d_in; ++j) {
    const T* g = gp + j * NR;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const T a = x[r * d_in + j];
#pragma omp simd
      for (int t = 0; t < NR; ++t) c[r][t] += a * g[t];
    }
  }
  for (int r = 0; r < MR; ++r) {
    const T* dr = delta + r * d_out;
    double s = 0;
    for (int64_t t = 0; t < nc; ++t) s += static_cast<double>(dr[t]) * static_cast<double>(c[r][t]);
    out[r * out_stride] += s;
  }
}

// acc[(r - r0) * K + k] += Σ_o δ_{r,o} (G_w[k, o] · h_r) for the rows r of one block, from
// the packed panels: each panel passes once over the block's rows, kTileRows at a time.
template <typename T>
FFE_INLINE void block_dots_impl(const T* h, const T* delta, const T* Gp, const GhostShape& s,
                                int64_t r0, int64_t r1, double* acc) {
  constexpr int NR = kPanel<T>;
  const int64_t d_in = s.d_in, d_out = s.d_out, K = s.K, P = n_panels(s, NR);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t p = 0; p < P; ++p) {
      const T* gp = Gp + (k * P + p) * d_in * NR;
      const int64_t o0 = p * NR, nc = std::min<int64_t>(NR, d_out - o0);
      for (int64_t r = r0; r < r1; r += kTileRows) {
        const T* x = h + r * d_in;
        const T* dl = delta + r * d_out + o0;
        double* out = acc + (r - r0) * K + k;
        switch (std::min<int64_t>(kTileRows, r1 - r)) {
          case 6: tile_dots<T, 6>(x, dl, d_in, d_out, gp, nc, out, K); break;
          case 5: tile_dots<T, 5>(x, dl, d_in, d_out, gp, nc, out, K); break;
          case 4: tile_dots<T, 4>(x, dl, d_in, d_out, gp, nc, out, K); break;
          case 3: tile_dots<T, 3>(x, dl, d_in, d_out, gp, nc, out, K); break;
          case 2: tile_dots<T, 2>(x, dl, d_in, d_out, gp, nc, out, K); break;
          default: tile_dots<T, 1>(x, dl, d_in, d_out, gp, nc, out, K); break;
        }
      }
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

FFE_MULTIVERSION void block_dots(const float* h, const float* delta, const float* Gp,
                                 const GhostShape& s, int64_t r0, int64_t r1, double* acc) {
  block_dots_impl(h, delta, Gp, s, r0, r1, acc);
}

FFE_MULTIVERSION void block_dots(const double* h, const double* delta, const double* Gp,
                                 const GhostShape& s, int64_t r0, int64_t r1, double* acc) {
  block_dots_impl(h, delta, Gp, s, r0, r1, acc);
}

// Scores samples [i0, i1) (Gp: G_w packed by pack_panel). `acc` is scratch of size
// (i1 - i0) * V * K.
template <typename T>
void score_block(const T* h, const T* delta, const T* Gp, const T* G_b, const GhostShape& s,
                 int64_t i0, int64_t i1, T* dots, T* sqnorm, std::vector<double>& acc,
                 std::vector<double>& delta_sum) {
  const int64_t V = s.V, d_in = s.d_in, d_out = s.d_out, K = s.K;
  const int64_t r0 = i0 * V, r1 = i1 * V, nr = r1 - r0;
  acc.assign(static_cast<size_t>(nr * K), 0.0);

  block_dots(h, delta, Gp, s, r0, r1, acc.data());

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
#ifdef FFENGINE_HAVE_OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  const int threads = 1;
#endif
  // Blocks of about kRowsPerBlock rows, but at least one block per thread.
  const int64_t V = std::max<int64_t>(1, shape.V);
  const int64_t samples_per_block = std::max<int64_t>(
      1, std::min<int64_t>(kRowsPerBlock / V, (B + threads - 1) / threads));
  const int64_t n_blocks = (B + samples_per_block - 1) / samples_per_block;
  const int64_t P = n_panels(shape, kPanel<T>);
  std::vector<T> Gp(static_cast<size_t>(shape.K * P * shape.d_in * kPanel<T>));

#ifdef FFENGINE_HAVE_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
#ifdef FFENGINE_HAVE_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t kp = 0; kp < shape.K * P; ++kp) pack_panel(G_w, shape, kp / P, kp % P, Gp.data());
    // (the implicit barrier of the loop above: every panel is packed before any block reads it)
    std::vector<double> acc, delta_sum;
#ifdef FFENGINE_HAVE_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t i0 = blk * samples_per_block;
      const int64_t i1 = std::min(B, i0 + samples_per_block);
      score_block(h, delta, Gp.data(), G_b, shape, i0, i1, dots, sqnorm, acc, delta_sum);
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
