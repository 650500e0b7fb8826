"""Ghost score of one Linear layer, without materializing per-sample gradients.

For ``y = W h + b``, sample ``i`` with views ``v``, inputs ``h_{i,v}``, backprop signals
``δ_{i,v}`` and K stacked gradients ``(G_w[k], G_b[k])`` (DESIGN.md §2, "The fast path"):

    dots[i, k] = Σ_v δ_{i,v} · (G_w[k] h_{i,v}) + G_b[k] · Σ_v δ_{i,v}
    sqnorm[i]  = Σ_{v,v'} (δ_{i,v}·δ_{i,v'}) (h_{i,v}·h_{i,v'}) + ‖Σ_v δ_{i,v}‖²

(bias terms only when ``G_b`` is given). Backends: "torch" (vectorized torch, any device and
float dtype, differentiable), "cpu" (the compiled ``ffengine._C``; CPU float32/float64).
"triton" and "cuda" are reserved names, not implemented yet.

Backend choice: an explicit ``backend`` argument beats the ``FFENGINE_BACKEND`` environment
variable, which beats auto. ``None`` and ``"auto"`` both mean "not chosen": the variable is
consulted, then auto picks "cpu" when the extension loads and passes a self-check against the
torch backend, else "torch" with one logged warning.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

from ffengine import _ext
from ffengine.errors import BackendUnavailableError

ENV_VAR = "FFENGINE_BACKEND"
BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")
_NOT_IMPLEMENTED = ("triton", "cuda")
_CPU_DTYPES = (torch.float32, torch.float64)
# Upper bound on the elements of the (chunk, V, K, d_out) intermediate of ghost_score_torch.
_MAX_INTERMEDIATE_ELEMENTS = 1 << 24

_logger = logging.getLogger(__name__)
_lock = threading.Lock()
_cpu_check_done = False
_cpu_check_failure: str | None = None
_auto_choice: str | None = None


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _validate(
    h: torch.Tensor, delta: torch.Tensor, G_w: torch.Tensor, G_b: torch.Tensor | None
) -> None:
    """Raise ValueError/TypeError naming the argument, what was expected and what was received."""
    named = {"h": h, "delta": delta, "G_w": G_w}
    if G_b is not None:
        named["G_b"] = G_b
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"ghost_score: argument {name!r} must be a torch.Tensor; received "
                f"{type(t).__name__}"
            )
    layouts = {
        "h": "(B, V, d_in)",
        "delta": "(B, V, d_out)",
        "G_w": "(K, d_out, d_in)",
        "G_b": "(K, d_out)",
    }
    for name, t in named.items():
        ndim = 2 if name == "G_b" else 3
        if t.ndim != ndim:
            raise ValueError(
                f"ghost_score: argument {name!r} must have {ndim} dimensions "
                f"{layouts[name]}; received shape {_shape(t)}"
            )
    B, V, d_in = h.shape
    d_out = delta.shape[2]
    K = G_w.shape[0]
    if delta.shape[:2] != (B, V):
        raise ValueError(
            f"ghost_score: argument 'delta' must have shape (B, V, d_out) with (B, V) = "
            f"{(B, V)} as in h {_shape(h)}; received {_shape(delta)}"
        )
    if G_w.shape[1:] != (d_out, d_in):
        raise ValueError(
            f"ghost_score: argument 'G_w' must have shape (K, d_out, d_in) with (d_out, d_in) = "
            f"{(d_out, d_in)} from delta {_shape(delta)} and h {_shape(h)}; received {_shape(G_w)}"
        )
    if G_b is not None and G_b.shape != (K, d_out):
        raise ValueError(
            f"ghost_score: argument 'G_b' must have shape (K, d_out) = {(K, d_out)}; "
            f"received {_shape(G_b)}"
        )
    if not h.dtype.is_floating_point:
        raise ValueError(
            f"ghost_score: argument 'h' must have a floating-point dtype; received {h.dtype}"
        )
    for name, t in named.items():
        if t.dtype != h.dtype:
            raise ValueError(
                f"ghost_score: argument {name!r} must have dtype {h.dtype} like h; "
                f"received {t.dtype}"
            )
        if t.device != h.device:
            raise ValueError(
                f"ghost_score: argument {name!r} must be on device {h.device} like h; "
                f"received {t.device}"
            )


def ghost_score_torch(
    h: torch.Tensor,
    delta: torch.Tensor,
    G_w: torch.Tensor,
    G_b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorized torch ghost score; never forms a (d_out, d_in) per-sample gradient.

    Args:
        h: (B, V, d_in) layer inputs.
        delta: (B, V, d_out) backprop signals ``∂ℓ/∂y``.
        G_w: (K, d_out, d_in) stacked weight gradients.
        G_b: (K, d_out) stacked bias gradients, or None for a layer without bias.

    Returns:
        ``(dots (B, K), sqnorm (B,))`` in the input dtype (see the module docstring).
        Works on any device and float dtype and is differentiable.
    """
    _validate(h, delta, G_w, G_b)
    B, V, d_in = h.shape
    K, d_out, _ = G_w.shape
    G_rows = G_w.reshape(K * d_out, d_in)

    # dots: P[i, v, k, :] = G_w[k] h_{i,v} for all rows at once (one GEMM), contracted with
    # δ_{i,v}. Chunked over samples to bound the (chunk, V, K, d_out) intermediate.
    per_sample = max(1, V * K * d_out)
    chunk = max(1, _MAX_INTERMEDIATE_ELEMENTS // per_sample)
    dot_chunks = []
    for start in range(0, B, chunk):
        h_c = h[start : start + chunk]
        d_c = delta[start : start + chunk]
        n = h_c.shape[0]
        P = h_c.reshape(n * V, d_in) @ G_rows.T  # (n*V, K*d_out)
        contrib = torch.bmm(P.reshape(n * V, K, d_out), d_c.reshape(n * V, d_out, 1))
        dot_chunks.append(contrib.reshape(n, V, K).sum(dim=1))
    dots = torch.cat(dot_chunks) if dot_chunks else h.new_zeros(B, K)

    # sqnorm: ‖Σ_v δ_v h_vᵀ‖_F² from the per-sample V×V Gram matrices of δ and h.
    delta_gram = torch.bmm(delta, delta.transpose(1, 2))  # (B, V, V)
    h_gram = torch.bmm(h, h.transpose(1, 2))  # (B, V, V)
    sqnorm = (delta_gram * h_gram).sum(dim=(1, 2))

    if G_b is not None:
        delta_sum = delta.sum(dim=1)  # (B, d_out)
        dots = dots + delta_sum @ G_b.T
        sqnorm = sqnorm + delta_sum.pow(2).sum(dim=1)
    # ‖g_i‖² ≥ 0; rounding (V > 1) must not make it negative, the score takes its root.
    return dots, sqnorm.clamp_min(0)


def _ghost_score_cpu(
    h: torch.Tensor, delta: torch.Tensor, G_w: torch.Tensor, G_b: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The compiled op on CPU tensors; zero-copy in and out for contiguous inputs."""
    C = _ext.load_extension()
    if C is None:
        raise BackendUnavailableError(
            f"ghost_score backend 'cpu' cannot run: {_ext.unavailable_reason()}"
        )
    arrays = [t.detach().contiguous().numpy() for t in (h, delta, G_w)]
    gb = None if G_b is None else G_b.detach().contiguous().numpy()
    dots, sqnorm = C.ghost_score(*arrays, gb, num_threads=torch.get_num_threads())
    return torch.from_numpy(dots), torch.from_numpy(sqnorm)


def _cpu_self_check() -> str | None:
    """Why the compiled op must not be trusted, or None. Cached for the process."""
    global _cpu_check_done, _cpu_check_failure
    with _lock:
        if _cpu_check_done:
            return _cpu_check_failure
    if _ext.load_extension() is None:
        failure = _ext.unavailable_reason()
    else:
        failure = None
        gen = torch.Generator().manual_seed(0)
        for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
            for with_bias in (True, False):
                h = torch.randn(3, 2, 7, generator=gen, dtype=torch.float64).to(dtype)
                delta = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64).to(dtype)
                G_w = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64).to(dtype)
                G_b = torch.randn(2, 5, generator=gen, dtype=torch.float64).to(dtype)
                G_b = G_b if with_bias else None
                try:
                    got = _ghost_score_cpu(h, delta, G_w, G_b)
                except Exception as e:  # any failure means: do not trust this backend
                    failure = f"self-check raised {type(e).__name__}: {e}"
                    break
                want = ghost_score_torch(h, delta, G_w, G_b)
                for name, g, w in zip(("dots", "sqnorm"), got, want, strict=True):
                    scale = float(w.abs().max())
                    err = float((g - w).abs().max())
                    if g.dtype != dtype or g.shape != w.shape or not err <= rtol * scale:
                        failure = (
                            f"self-check failed: {name} ({dtype}, bias={with_bias}) differs "
                            f"from the torch backend by {err:.3g} (scale {scale:.3g}, "
                            f"rtol {rtol:g})"
                        )
                        break
                if failure:
                    break
            if failure:
                break
    with _lock:
        _cpu_check_done, _cpu_check_failure = True, failure
    return failure


def _auto_backend() -> str:
    global _auto_choice
    with _lock:
        if _auto_choice is not None:
            return _auto_choice
    failure = _cpu_self_check()
    choice = "cpu" if failure is None else "torch"
    with _lock:
        first = _auto_choice is None
        _auto_choice = choice
    if failure is not None and first:
        _logger.warning(
            "ghost_score backend 'auto': the compiled CPU backend is not used (%s); "
            "falling back to the pure-torch backend",
            failure,
        )
    return choice


def _resolve(name: str | None) -> tuple[str, bool]:
    """(concrete backend, whether it was chosen by auto)."""
    source = "argument backend"
    if name is not None and not isinstance(name, str):
        raise BackendUnavailableError(
            f"unknown ghost_score backend {name!r} (from {source}); expected one of {BACKENDS}"
        )
    if name is None or name.strip().lower() == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            name, source = env, f"environment variable {ENV_VAR}"
        else:
            name = "auto"
    key = name.strip().lower()
    if key not in BACKENDS:
        raise BackendUnavailableError(
            f"unknown ghost_score backend {name!r} (from {source}); expected one of {BACKENDS}"
        )
    if key == "auto":
        return _auto_backend(), True
    if key in _NOT_IMPLEMENTED:
        raise BackendUnavailableError(
            f"ghost_score backend {key!r} (from {source}) is not implemented yet; "
            "use 'torch' or 'cpu'"
        )
    if key == "cpu":
        failure = _cpu_self_check()
        if failure is not None:
            raise BackendUnavailableError(
                f"ghost_score backend 'cpu' (from {source}) cannot run: {failure}; "
                "use backend='torch' instead"
            )
    return key, False


def resolve_backend(name: str | None = None) -> str:
    """The concrete backend ("torch" or "cpu") that ``ghost_score`` would use for ``name``.

    ``name`` beats the ``FFENGINE_BACKEND`` variable, which beats auto; ``None`` and "auto"
    mean "not chosen". Raises BackendUnavailableError for an unknown name or a named backend
    that cannot run here, with the reason.
    """
    return _resolve(name)[0]


def _cpu_input_problem(tensors: list[torch.Tensor]) -> str | None:
    h = tensors[0]
    if h.device.type != "cpu":
        return f"inputs are on {h.device}, the cpu backend needs CPU tensors"
    if h.dtype not in _CPU_DTYPES:
        return f"inputs have dtype {h.dtype}, the cpu backend supports float32 and float64"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "inputs require grad and the cpu backend is not differentiable"
    return None


def ghost_score(
    h: torch.Tensor,
    delta: torch.Tensor,
    G_w: torch.Tensor,
    G_b: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample dots with K stacked gradients and squared gradient norms of a Linear layer.

    Args:
        h: (B, V, d_in) layer inputs.
        delta: (B, V, d_out) backprop signals ``∂ℓ/∂y``.
        G_w: (K, d_out, d_in) stacked weight gradients.
        G_b: (K, d_out) stacked bias gradients, or None for a layer without bias.
        backend: "auto", "torch", "cpu" ("triton", "cuda": not implemented yet), or None:
            see the module docstring. When auto picks "cpu" but the inputs do not suit it
            (not on CPU, half precision, or needing autograd), "torch" runs instead.

    Returns:
        ``(dots (B, K), sqnorm (B,))`` in the input dtype, on the input device.

    Raises:
        ValueError, TypeError: bad shapes, dtypes or devices (the message names the argument).
        BackendUnavailableError: unknown backend, or a named backend that cannot run here.
    """
    _validate(h, delta, G_w, G_b)
    chosen, by_auto = _resolve(backend)
    if chosen == "cpu":
        tensors = [h, delta, G_w] + ([] if G_b is None else [G_b])
        problem = _cpu_input_problem(tensors)
        if problem is None:
            return _ghost_score_cpu(h, delta, G_w, G_b)
        if not by_auto:
            raise BackendUnavailableError(
                f"ghost_score backend 'cpu' cannot run on these inputs: {problem}; "
                "use backend='torch'"
            )
    return ghost_score_torch(h, delta, G_w, G_b)


def _reset_backend_cache() -> None:
    """Forget the cached self-check and auto choice (tests only)."""
    global _cpu_check_done, _cpu_check_failure, _auto_choice
    with _lock:
        _cpu_check_done, _cpu_check_failure, _auto_choice = False, None, None
