// Ghost score of one Linear layer y = W h + b against K stacked cosine gradients
// (DESIGN.md §2, "The fast path"). Shapes: h (B, V, d_in), delta (B, V, d_out),
// G_w (K, d_out, d_in), G_b (K, d_out) or null; outputs dots (B, K), sqnorm (B).
//
//   dots[i,k]  = Σ_v δ_{i,v} · (G_w[k] h_{i,v})  + G_b[k] · Σ_v δ_{i,v}
//   sqnorm[i]  = Σ_{v,v'} (δ_{i,v}·δ_{i,v'}) (h_{i,v}·h_{i,v'}) + ‖Σ_v δ_{i,v}‖²
//
// (bias terms only when G_b is given). The per-sample gradient g_i(W) = Σ_v δ_{i,v} h_{i,v}ᵀ
// is never formed. All arrays are C-contiguous; the caller has validated shapes.
#pragma once

#include <cstdint>

namespace ffengine {

struct GhostShape {
  int64_t B, V, d_in, d_out, K;
};

template <typename T>
void ghost_score_cpu(const T* h, const T* delta, const T* G_w, const T* G_b,
                     const GhostShape& shape, T* dots, T* sqnorm, int num_threads);

// True when the module was compiled with OpenMP (the sample loop runs in parallel).
bool has_openmp();

}  // namespace ffengine
