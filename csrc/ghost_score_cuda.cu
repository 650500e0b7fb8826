// CUDA ghost score of one Linear layer (DESIGN.md §2, "The fast path"): the "cuda" backend of
// ffengine.ops.ghost_score. Built at first use by ffengine/ops/cuda_ext.py through
// torch.utils.cpp_extension.load, only where a CUDA device and nvcc are present.
//
// For y = W h + b, sample i with views v, inputs h_{i,v}, backprop signals δ_{i,v} and K
// stacked gradients (G_w[k], G_b[k]):
//
//   dots[i, k] = Σ_v δ_{i,v} · (G_w[k] h_{i,v}) + G_b[k] · Σ_v δ_{i,v}
//   sqnorm[i]  = Σ_{v,v'} (δ_{i,v}·δ_{i,v'}) (h_{i,v}·h_{i,v'}) + ‖Σ_v δ_{i,v}‖²
//
// Two kernels, neither writing a per-sample gradient or the G·h product to global memory:
//
// * row_dots_kernel: one block per (tile of 64 sample-view rows, k). It walks d_out in tiles
//   of 64; for each it accumulates the (64 × 64) tile of h·G_w[k]ᵀ over d_in in shared-memory
//   slabs of 16 (each thread a 4 × 4 register tile), adds G_b[k], multiplies by δ and reduces
//   over the tile's outputs into a per-row running sum. The result is one number per
//   (sample-view row, k); the launcher sums each sample's V rows (B·V·K floats). Every sum has
//   a fixed order: the results do not depend on scheduling (no atomics).
// * sqnorm_kernel: one warp per sample; the V×V Gram entries of h and δ (v ≤ v') as warp
//   reductions, combined as above.
//
// Inputs: float32, float64, bfloat16 or float16, any strides (element strides are passed);
// products are accumulated in float32 (float64 for float64 inputs), the outputs are in that
// accumulation type. No tensor cores: float32 results match a float64 reference to float32
// rounding, like the Triton kernels' input_precision="ieee".

#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace {

constexpr int kThreadsX = 16;  // threads along the outputs of a tile
constexpr int kThreadsY = 16;  // threads along its rows
constexpr int kMicro = 4;      // each thread: kMicro rows × kMicro outputs
constexpr int kTileRows = kThreadsY * kMicro;  // 64
constexpr int kTileOut = kThreadsX * kMicro;   // 64
constexpr int kSlab = 16;                      // d_in per shared-memory step
constexpr int kThreads = kThreadsX * kThreadsY;

// The address of element (row, col) of a (B, V, cols) tensor, row = b·V + v.
struct Rows {
  int64_t sb, sv, sc;
  int V;
  __device__ __forceinline__ int64_t offset(int64_t row, int64_t col) const {
    return (row / V) * sb + (row % V) * sv + col * sc;
  }
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
row_dots_kernel(const scalar_t* __restrict__ h, Rows hr, const scalar_t* __restrict__ delta,
                Rows dr, const scalar_t* __restrict__ gw, int64_t sgk, int64_t sgo, int64_t sgi,
                const scalar_t* __restrict__ gb, int64_t sbk, int64_t sbo, bool has_bias,
                acc_t* __restrict__ row_dot,  // (R, K), contiguous
                int64_t R, int d_in, int d_out, int K) {
  __shared__ acc_t h_s[kSlab][kTileRows];  // h slab, transposed: [input][row]
  __shared__ acc_t g_s[kSlab][kTileOut];   // G_w[k] slab, transposed: [input][output]

  const int tx = threadIdx.x % kThreadsX;
  const int ty = threadIdx.x / kThreadsX;
  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int k = blockIdx.y;
  const scalar_t* gw_k = gw + k * sgk;

  acc_t row_sum[kMicro];  // δ_r · (G_w[k] h_r + G_b[k]) for rows ty + 16 m, this thread's part
#pragma unroll
  for (int m = 0; m < kMicro; ++m) row_sum[m] = acc_t(0);

  for (int o0 = 0; o0 < d_out; o0 += kTileOut) {
    acc_t acc[kMicro][kMicro];
#pragma unroll
    for (int m = 0; m < kMicro; ++m)
#pragma unroll
      for (int n = 0; n < kMicro; ++n) acc[m][n] = acc_t(0);

    for (int i0 = 0; i0 < d_in; i0 += kSlab) {
      // Each tile holds kSlab × 64 = 1024 elements: 4 per thread, consecutive threads on
      // consecutive inputs of one row (coalesced for contiguous rows).
#pragma unroll
      for (int j = 0; j < (kSlab * kTileRows) / kThreads; ++j) {
        const int idx = tid + j * kThreads;
        const int r = idx / kSlab, i = idx % kSlab;
        const int64_t row = row0 + r;
        const int col = i0 + i;
        h_s[i][r] = (row < R && col < d_in) ? static_cast<acc_t>(h[hr.offset(row, col)])
                                            : acc_t(0);
        const int o = o0 + r;
        g_s[i][r] = (o < d_out && col < d_in)
                        ? static_cast<acc_t>(gw_k[o * sgo + static_cast<int64_t>(col) * sgi])
                        : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kSlab; ++i) {
        acc_t a[kMicro], b[kMicro];
#pragma unroll
        for (int m = 0; m < kMicro; ++m) a[m] = h_s[i][ty + kThreadsY * m];
#pragma unroll
        for (int n = 0; n < kMicro; ++n) b[n] = g_s[i][tx + kThreadsX * n];
#pragma unroll
        for (int m = 0; m < kMicro; ++m)
#pragma unroll
          for (int n = 0; n < kMicro; ++n) acc[m][n] = fma(a[m], b[n], acc[m][n]);
      }
      __syncthreads();
    }

    // epilogue: (G_w[k] h_r)_o + G_b[k]_o, times δ_{r,o}, summed into the row's running sum
#pragma unroll
    for (int n = 0; n < kMicro; ++n) {
      const int o = o0 + tx + kThreadsX * n;
      if (o >= d_out) continue;
      const acc_t bias = has_bias ? static_cast<acc_t>(gb[k * sbk + o * sbo]) : acc_t(0);
#pragma unroll
      for (int m = 0; m < kMicro; ++m) {
        const int64_t row = row0 + ty + kThreadsY * m;
        if (row < R) {
          const acc_t d = static_cast<acc_t>(delta[dr.offset(row, o)]);
          row_sum[m] = fma(acc[m][n] + bias, d, row_sum[m]);
        }
      }
    }
  }

  // Sum each row over the 16 threads that share it (lanes tx = 0..15 of one half-warp).
#pragma unroll
  for (int m = 0; m < kMicro; ++m) {
    acc_t s = row_sum[m];
#pragma unroll
    for (int off = kThreadsX / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    const int64_t row = row0 + ty + kThreadsY * m;
    if (tx == 0 && row < R) row_dot[row * K + k] = s;
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t warp_dot(const scalar_t* a, int64_t sa,
                                          const scalar_t* b, int64_t sb, int n, int lane) {
  acc_t s = acc_t(0);
  for (int c = lane; c < n; c += 32)
    s = fma(static_cast<acc_t>(a[c * sa]), static_cast<acc_t>(b[c * sb]), s);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}

template <typename scalar_t, typename acc_t>
__global__ void sqnorm_kernel(const scalar_t* __restrict__ h, int64_t shb, int64_t shv,
                              int64_t shd, const scalar_t* __restrict__ delta, int64_t sdb,
                              int64_t sdv, int64_t sdd, bool has_bias,
                              acc_t* __restrict__ sqnorm, int64_t B, int V, int d_in,
                              int d_out) {
  const int lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (i >= B) return;  // a whole warp leaves together: the shuffles stay full-warp
  const scalar_t* hi = h + i * shb;
  const scalar_t* di = delta + i * sdb;
  acc_t total = acc_t(0);
  for (int v = 0; v < V; ++v) {
    for (int w = v; w < V; ++w) {
      const acc_t hh = warp_dot<scalar_t, acc_t>(hi + v * shv, shd, hi + w * shv, shd, d_in,
                                                 lane);
      const acc_t dd = warp_dot<scalar_t, acc_t>(di + v * sdv, sdd, di + w * sdv, sdd, d_out,
                                                 lane);
      // ‖Σ_v δ_v‖² = Σ_{v,v'} δ_v·δ_v': the bias adds 1 to every h Gram entry
      const acc_t term = (hh + (has_bias ? acc_t(1) : acc_t(0))) * dd;
      total += (v == w) ? term : acc_t(2) * term;
    }
  }
  // ‖g_i‖² >= 0; rounding (V > 1) must not make it negative, the score takes its root.
  if (lane == 0) sqnorm[i] = total > acc_t(0) ? total : acc_t(0);
}

void check_inputs(const torch::Tensor& h, const torch::Tensor& delta, const torch::Tensor& G_w,
                  const c10::optional<torch::Tensor>& G_b) {
  // ffengine.ops.ghost_score validates shapes, dtypes and devices with clear messages first;
  // these guard direct callers of the extension.
  TORCH_CHECK(h.is_cuda(), "ghost_score_cuda: argument 'h' must be a CUDA tensor");
  TORCH_CHECK(h.dim() == 3 && delta.dim() == 3 && G_w.dim() == 3,
              "ghost_score_cuda: h, delta and G_w must have 3 dimensions");
  TORCH_CHECK(delta.size(0) == h.size(0) && delta.size(1) == h.size(1),
              "ghost_score_cuda: delta must have shape (B, V, d_out) like h's (B, V)");
  TORCH_CHECK(G_w.size(1) == delta.size(2) && G_w.size(2) == h.size(2),
              "ghost_score_cuda: G_w must have shape (K, d_out, d_in)");
  std::vector<torch::Tensor> all{delta, G_w};
  if (G_b.has_value()) {
    TORCH_CHECK(G_b->dim() == 2 && G_b->size(0) == G_w.size(0) && G_b->size(1) == G_w.size(1),
                "ghost_score_cuda: G_b must have shape (K, d_out)");
    all.push_back(*G_b);
  }
  for (const auto& t : all) {
    TORCH_CHECK(t.device() == h.device(), "ghost_score_cuda: every input must be on ",
                h.device());
    TORCH_CHECK(t.scalar_type() == h.scalar_type(), "ghost_score_cuda: every input must have "
                "dtype ", h.scalar_type());
  }
  TORCH_CHECK(h.size(2) <= INT32_MAX && delta.size(2) <= INT32_MAX && h.size(1) <= INT32_MAX &&
                  G_w.size(0) <= 65535,
              "ghost_score_cuda: d_in, d_out and V must fit in 32 bits and K in 65535");
}

}  // namespace

// (dots (B, K), sqnorm (B,)) in the accumulation type: float32, or float64 for float64 inputs.
std::vector<torch::Tensor> ghost_score_cuda(const torch::Tensor& h, const torch::Tensor& delta,
                                            const torch::Tensor& G_w,
                                            const c10::optional<torch::Tensor>& G_b) {
  check_inputs(h, delta, G_w, G_b);
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t B = h.size(0);
  const int V = static_cast<int>(h.size(1));
  const int d_in = static_cast<int>(h.size(2));
  const int d_out = static_cast<int>(delta.size(2));
  const int K = static_cast<int>(G_w.size(0));
  const auto acc_type =
      h.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  const auto opts = h.options().dtype(acc_type);
  auto sqnorm = torch::empty({B}, opts);
  if (B == 0) return {torch::empty({B, K}, opts), sqnorm};
  const int64_t R = B * V;
  auto row_dot = torch::empty({R, K}, opts);
  const bool has_bias = G_b.has_value();
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, h.scalar_type(), "ghost_score_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* gb = has_bias ? G_b->data_ptr<scalar_t>() : nullptr;
        const int64_t sbk = has_bias ? G_b->stride(0) : 0;
        const int64_t sbo = has_bias ? G_b->stride(1) : 0;
        if (K > 0) {
          const Rows hr{h.stride(0), h.stride(1), h.stride(2), V};
          const Rows dr{delta.stride(0), delta.stride(1), delta.stride(2), V};
          const dim3 grid(static_cast<unsigned>((R + kTileRows - 1) / kTileRows), K);
          row_dots_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
              h.data_ptr<scalar_t>(), hr, delta.data_ptr<scalar_t>(), dr,
              G_w.data_ptr<scalar_t>(), G_w.stride(0), G_w.stride(1), G_w.stride(2), gb, sbk,
              sbo, has_bias, row_dot.data_ptr<acc_t>(), R, d_in, d_out, K);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        constexpr int kWarps = 8;
        const unsigned blocks = static_cast<unsigned>((B + kWarps - 1) / kWarps);
        sqnorm_kernel<scalar_t, acc_t><<<blocks, 32 * kWarps, 0, stream>>>(
            h.data_ptr<scalar_t>(), h.stride(0), h.stride(1), h.stride(2),
            delta.data_ptr<scalar_t>(), delta.stride(0), delta.stride(1), delta.stride(2),
            has_bias, sqnorm.data_ptr<acc_t>(), B, V, d_in, d_out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  // Σ over each sample's V rows, in view order (B·V·K numbers, not a per-sample gradient).
  auto dots = row_dot.view({B, V, K}).sum(1);
  return {dots, sqnorm};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ffengine's CUDA ghost-score kernels (built at first use, see ffengine/ops/cuda_ext.py)";
  m.def("ghost_score", &ghost_score_cuda, "(dots (B, K), sqnorm (B,)) of one Linear layer",
        pybind11::arg("h"), pybind11::arg("delta"), pybind11::arg("G_w"),
        pybind11::arg("G_b") = pybind11::none());
}
