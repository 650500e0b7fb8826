"""Fused Triton ghost score of one Linear layer (DESIGN.md §2, "The fast path").

For ``y = W h + b``, sample ``i`` with views ``v``, inputs ``h_{i,v}``, backprop signals
``δ_{i,v}`` and K stacked gradients ``(G_w[k], G_b[k])``:

    dots[i, k] = Σ_v δ_{i,v} · (G_w[k] h_{i,v}) + G_b[k] · Σ_v δ_{i,v}
    sqnorm[i]  = Σ_{v,v'} (δ_{i,v}·δ_{i,v'}) (h_{i,v}·h_{i,v'}) + ‖Σ_v δ_{i,v}‖²

(bias terms only when ``G_b`` is given). Two kernels, neither of which writes a per-sample
gradient or the ``G·h`` product to global memory:

* ``_ghost_score_kernel``: one program per (block of samples, k). The rows of the block are
  the samples' views, ``BLOCK_S × VP`` of them (``VP``: V rounded up to a power of two, the
  padding rows masked). For each tile of ``d_out`` it accumulates the (rows, BLOCK_O) tile of
  ``h @ G_w[k]ᵀ`` over ``d_in`` with ``tl.dot`` in registers, adds ``G_b[k]``, multiplies
  elementwise by ``δ`` and reduces over ``d_out``; the views of a sample are summed at the end.
* ``_ghost_sqnorm_kernel``: one program per block of samples. It forms the row Gram matrices
  ``h hᵀ`` and ``δ δᵀ`` of the block with ``tl.dot`` and keeps the entries that pair two views
  of the same sample (a small block-diagonal; the off-diagonal work is the price of using
  ``tl.dot``, which needs 16 rows, and is negligible next to the dots).

Inputs may be float32, bfloat16 or float16; every product is accumulated in float32 and the
outputs are float32. float32 dots use ``input_precision="ieee"`` (no TF32), so float32 results
match the reference to float32 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ffengine.ops.ghost_score import _validate

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Views of one sample share a program; beyond this the per-program tiles get too large.
MAX_VIEWS = 64
# Tile sizes. tl.dot needs every block dimension >= 16; smaller problems are padded by masks.
_ROWS_DOTS = 64  # sample-view rows per program of the dots kernel
_ROWS_GRAM = 32  # sample-view rows per program of the Gram kernel (its work grows as rows²)
_BLOCK_OUT = 64
_BLOCK_IN = 64
_BLOCK_GRAM = 128
# _NO_B_SPECIALIZATION: Triton compiles a kernel anew for each "kind" of integer argument (1,
# a multiple of 16, other), so a chunk's last, odd-sized batch cost a compile of every kernel
# of every scored layer in the middle of a pass: an H200 engine pass ran 2.6x slower on
# triton than on torch, about the time of those compiles (bench/README.md, "GPU"). The
# batch size B only bounds masks here, so one compiled kernel serves every B.


@triton.jit(do_not_specialize=["B"])  # see _NO_B_SPECIALIZATION
def _ghost_score_kernel(
    h_ptr,
    d_ptr,
    gw_ptr,
    gb_ptr,
    dots_ptr,
    B,
    V,
    D_IN,
    D_OUT,
    stride_hb,
    stride_hv,
    stride_hd,
    stride_db,
    stride_dv,
    stride_dd,
    stride_gk,
    stride_go,
    stride_gi,
    stride_bk,
    stride_bo,
    stride_ob,
    stride_ok,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    VP: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """dots[i, k] for the BLOCK_S samples of program 0-axis and the k of program 1-axis."""
    pid_s = tl.program_id(0)
    k = tl.program_id(1)
    BLOCK_R: tl.constexpr = BLOCK_S * VP
    rows = tl.arange(0, BLOCK_R)
    sample = pid_s * BLOCK_S + rows // VP
    view = rows % VP
    row_ok = (sample < B) & (view < V)
    sample64 = sample.to(tl.int64)
    h_rows = h_ptr + sample64 * stride_hb + view * stride_hv
    d_rows = d_ptr + sample64 * stride_db + view * stride_dv
    gw_k = gw_ptr + k.to(tl.int64) * stride_gk
    offs_o = tl.arange(0, BLOCK_O)
    offs_i = tl.arange(0, BLOCK_I)

    row_dot = tl.zeros((BLOCK_R,), dtype=tl.float32)  # δ_{i,v} · (G_w[k] h_{i,v} + G_b[k])
    for o0 in range(0, D_OUT, BLOCK_O):
        o = o0 + offs_o
        o_ok = o < D_OUT
        gh = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)  # tile of h @ G_w[k]ᵀ
        for i0 in range(0, D_IN, BLOCK_I):
            i = i0 + offs_i
            i_ok = i < D_IN
            h_tile = tl.load(
                h_rows[:, None] + i[None, :] * stride_hd,
                mask=row_ok[:, None] & i_ok[None, :],
                other=0.0,
            )
            g_tile = tl.load(  # (BLOCK_I, BLOCK_O) tile of G_w[k]ᵀ
                gw_k + i[:, None] * stride_gi + o[None, :] * stride_go,
                mask=i_ok[:, None] & o_ok[None, :],
                other=0.0,
            )
            if DOT_FP32:
                gh = tl.dot(
                    h_tile.to(tl.float32), g_tile.to(tl.float32), gh, input_precision="ieee"
                )
            else:
                gh = tl.dot(h_tile, g_tile, gh)
        if HAS_BIAS:
            gb = tl.load(gb_ptr + k * stride_bk + o * stride_bo, mask=o_ok, other=0.0)
            gh += gb.to(tl.float32)[None, :]
        d_tile = tl.load(
            d_rows[:, None] + o[None, :] * stride_dd,
            mask=row_ok[:, None] & o_ok[None, :],
            other=0.0,
        )
        row_dot += tl.sum(gh * d_tile.to(tl.float32), axis=1)

    per_sample = tl.sum(tl.reshape(row_dot, (BLOCK_S, VP)), axis=1)  # Σ over the views
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    tl.store(dots_ptr + s.to(tl.int64) * stride_ob + k * stride_ok, per_sample, mask=s < B)


@triton.jit
def _row_gram(rows_ptr, stride_c, N_COLS, row_ok, BLOCK_R: tl.constexpr,
              BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    """(BLOCK_R, BLOCK_R) float32 Gram matrix of the rows starting at ``rows_ptr``, over
    ``N_COLS`` columns in tiles of BLOCK_D; masked rows are zero."""
    offs = tl.arange(0, BLOCK_D)
    gram = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for c0 in range(0, N_COLS, BLOCK_D):
        c = c0 + offs
        t = tl.load(
            rows_ptr[:, None] + c[None, :] * stride_c,
            mask=row_ok[:, None] & (c < N_COLS)[None, :],
            other=0.0,
        )
        if DOT_FP32:
            t = t.to(tl.float32)
            gram = tl.dot(t, tl.trans(t), gram, input_precision="ieee")
        else:
            gram = tl.dot(t, tl.trans(t), gram)
    return gram


@triton.jit(do_not_specialize=["B"])  # see _NO_B_SPECIALIZATION
def _ghost_sqnorm_kernel(
    h_ptr,
    d_ptr,
    sq_ptr,
    B,
    V,
    D_IN,
    D_OUT,
    stride_hb,
    stride_hv,
    stride_hd,
    stride_db,
    stride_dv,
    stride_dd,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    VP: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """sqnorm[i] = Σ_{v,v'} (δ_v·δ_v')(h_v·h_v') [+ Σ_{v,v'} δ_v·δ_v'] for BLOCK_S samples."""
    pid_s = tl.program_id(0)
    BLOCK_R: tl.constexpr = BLOCK_S * VP
    rows = tl.arange(0, BLOCK_R)
    sample = pid_s * BLOCK_S + rows // VP
    view = rows % VP
    row_ok = (sample < B) & (view < V)
    sample64 = sample.to(tl.int64)
    h_rows = h_ptr + sample64 * stride_hb + view * stride_hv
    d_rows = d_ptr + sample64 * stride_db + view * stride_dv
    hh = _row_gram(h_rows, stride_hd, D_IN, row_ok, BLOCK_R, BLOCK_D, DOT_FP32)  # h_r · h_r'
    dd = _row_gram(d_rows, stride_dd, D_OUT, row_ok, BLOCK_R, BLOCK_D, DOT_FP32)  # δ_r · δ_r'

    if HAS_BIAS:
        hh += 1.0  # ‖Σ_v δ_v‖² = Σ_{v,v'} δ_v·δ_v'
    same_sample = (rows[:, None] // VP) == (rows[None, :] // VP)
    row_sq = tl.sum(tl.where(same_sample, hh * dd, 0.0), axis=1)
    per_sample = tl.sum(tl.reshape(row_sq, (BLOCK_S, VP)), axis=1)
    # ‖g_i‖² >= 0; rounding (V > 1) must not make it negative, the score takes its root.
    per_sample = tl.maximum(per_sample, 0.0)
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    tl.store(sq_ptr + s.to(tl.int64), per_sample, mask=s < B)


def interpreted() -> bool:
    """Whether these kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` was set
    when this module was imported) rather than compiled for a GPU."""
    # Under the interpreter, triton.jit returns an InterpretedFunction, not a JITFunction.
    return not isinstance(_ghost_score_kernel, triton.JITFunction)


def _pow2_clamp(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(n, 1))))


def _check_kernel_inputs(h: torch.Tensor) -> None:
    """What the launcher needs beyond ghost_score's own checks: dtype, views, device."""
    if h.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"ghost_score_triton: argument 'h' has dtype {h.dtype}; the Triton kernel takes "
            "float32, bfloat16 or float16 (accumulating in float32). Cast the inputs, or use "
            "ffengine.ops.ghost_score(..., backend='torch')"
        )
    if h.shape[1] > MAX_VIEWS:
        raise ValueError(
            f"ghost_score_triton: argument 'h' has V = {h.shape[1]} views per sample; the "
            f"Triton kernel takes at most {MAX_VIEWS}. Use backend='torch' for this layer"
        )
    if h.device.type == "cuda":
        if interpreted():
            raise ValueError(
                "ghost_score_triton: argument 'h' is on a CUDA device but the Triton kernels "
                "were defined in interpreter mode (TRITON_INTERPRET=1 at import). Unset "
                "TRITON_INTERPRET and restart the process to run them compiled"
            )
    elif h.device.type == "cpu":
        if not interpreted():
            raise ValueError(
                "ghost_score_triton: argument 'h' is on the CPU; the Triton kernels run on CUDA "
                "tensors, or on CPU tensors only in the interpreter (set TRITON_INTERPRET=1 "
                "before ffengine.kernels.ghost_score is imported; a slow test mode)"
            )
    else:
        raise ValueError(
            f"ghost_score_triton: argument 'h' is on {h.device}; the Triton kernels take CUDA "
            "tensors (or CPU tensors under TRITON_INTERPRET=1)"
        )


def ghost_score_triton(
    h: torch.Tensor,
    delta: torch.Tensor,
    G_w: torch.Tensor,
    G_b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample dots with K stacked gradients and squared gradient norms, fused in Triton.

    Args:
        h: (B, V, d_in) layer inputs.
        delta: (B, V, d_out) backprop signals ``∂ℓ/∂y``.
        G_w: (K, d_out, d_in) stacked weight gradients.
        G_b: (K, d_out) stacked bias gradients, or None for a layer without bias.

        All on one CUDA device (or the CPU under ``TRITON_INTERPRET=1``), all of one dtype:
        float32, bfloat16 or float16. Any strides. Not differentiable.

    Returns:
        ``(dots (B, K), sqnorm (B,))``, float32, on the input device, with
        ``dots[i, k] = Σ_v δ_{i,v}·(G_w[k] h_{i,v}) + G_b[k]·Σ_v δ_{i,v}`` and
        ``sqnorm[i] = Σ_{v,v'} (δ_{i,v}·δ_{i,v'})(h_{i,v}·h_{i,v'}) + ‖Σ_v δ_{i,v}‖²``
        (bias terms only with ``G_b``).

    Raises:
        TypeError, ValueError: bad types, shapes, dtypes or devices (naming the argument).
    """
    _validate(h, delta, G_w, G_b, op="ghost_score_triton")
    _check_kernel_inputs(h)
    B, V, d_in = h.shape
    K, d_out, _ = G_w.shape
    dots = torch.empty(B, K, dtype=torch.float32, device=h.device)
    sqnorm = torch.empty(B, dtype=torch.float32, device=h.device)
    if B == 0:
        return dots, sqnorm

    # The CPU interpreter mishandles tl.dot on bfloat16 (it multiplies the raw bit patterns),
    # so there the tiles are upcast first. bf16/fp16 products are exact in float32, so this is
    # the same arithmetic the GPU's tensor cores do, up to the order of the float32 sums.
    dot_fp32 = h.dtype == torch.float32 or interpreted()
    has_bias = G_b is not None
    gb = G_b if has_bias else G_w  # unused placeholder pointer when there is no bias
    gb_strides = G_b.stride() if has_bias else (0, 0)
    vp = triton.next_power_of_2(max(V, 1))

    rows = _pow2_clamp(B * vp, 16, max(_ROWS_DOTS, vp))
    if K > 0:
        block_s = rows // vp
        _ghost_score_kernel[(triton.cdiv(B, block_s), K)](
            h,
            delta,
            G_w,
            gb,
            dots,
            B,
            V,
            d_in,
            d_out,
            *h.stride(),
            *delta.stride(),
            *G_w.stride(),
            *gb_strides,
            *dots.stride(),
            HAS_BIAS=has_bias,
            DOT_FP32=dot_fp32,
            VP=vp,
            BLOCK_S=block_s,
            BLOCK_O=_pow2_clamp(d_out, 16, _BLOCK_OUT),
            BLOCK_I=_pow2_clamp(d_in, 16, _BLOCK_IN),
        )

    rows = _pow2_clamp(B * vp, 16, max(_ROWS_GRAM, vp))
    block_s = rows // vp
    _ghost_sqnorm_kernel[(triton.cdiv(B, block_s),)](
        h,
        delta,
        sqnorm,
        B,
        V,
        d_in,
        d_out,
        *h.stride(),
        *delta.stride(),
        HAS_BIAS=has_bias,
        DOT_FP32=dot_fp32,
        VP=vp,
        BLOCK_S=block_s,
        BLOCK_D=_pow2_clamp(max(d_in, d_out), 16, _BLOCK_GRAM),
    )
    return dots, sqnorm
