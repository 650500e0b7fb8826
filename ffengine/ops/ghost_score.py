"""Ghost score of one Linear layer, without materializing per-sample gradients.

For ``y = W h + b``, sample ``i`` with views ``v``, inputs ``h_{i,v}``, backprop signals
``δ_{i,v}`` and K stacked gradients ``(G_w[k], G_b[k])`` (DESIGN.md §2, "The fast path"):

    dots[i, k] = Σ_v δ_{i,v} · (G_w[k] h_{i,v}) + G_b[k] · Σ_v δ_{i,v}
    sqnorm[i]  = Σ_{v,v'} (δ_{i,v}·δ_{i,v'}) (h_{i,v}·h_{i,v'}) + ‖Σ_v δ_{i,v}‖²

(bias terms only when ``G_b`` is given). Backends:

* "torch": vectorized torch, any device and float dtype, differentiable.
* "cpu": the compiled ``ffengine._C``; CPU float32/float64.
* "triton": the fused kernels of ``ffengine.kernels.ghost_score``; CUDA tensors in float32,
  bfloat16 or float16 (float32 accumulation). On CPU tensors only under Triton's interpreter
  (``TRITON_INTERPRET=1`` set before the kernels are imported), a slow test mode.
* "cuda": the CUDA kernels of ``csrc/ghost_score_cuda.cu`` (float32 or float64 accumulation,
  no tensor cores); CUDA tensors in float32, float64, bfloat16 or float16. Compiled at first
  use where a CUDA device and nvcc are present (``ffengine.ops.cuda_ext``), never at install.

Backend choice: an explicit ``backend`` argument beats the ``FFENGINE_BACKEND`` environment
variable, which beats auto. ``None`` and ``"auto"`` both mean "not chosen": the variable is
consulted, then auto takes, for the inputs' device, the first backend of a static preference
list (``_AUTO_PREFERENCE``, fastest first, from measurements) that can run there and passes a
self-check against a float64 evaluation of the torch backend; a backend skipped because it
cannot run logs one warning per device. A backend named explicitly that cannot run raises
BackendUnavailableError with the reason.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

from ffengine import _ext
from ffengine.errors import BackendUnavailableError
from ffengine.options import BACKENDS

ENV_VAR = "FFENGINE_BACKEND"
_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Upper bound on the elements of the (chunk, V, K, d_out) intermediate of ghost_score_torch.
_MAX_INTERMEDIATE_ELEMENTS = 1 << 24

# auto's choice per device type, fastest first; "torch" (runs anywhere) ends every list.
# CUDA: the fused Triton kernels keep each tile of G·h in registers and reduce it against δ
# at once, where the torch composite writes the whole (B·V, K·d_out) product to memory and
# reads it back. (Expected, not yet measured on a GPU: bench/bench_ghost_score.py.)
# CPU: the compiled "cpu" op (packed G panels, a register tile fused with the δ contraction).
# One thread (2026-12-03): 0.73-0.90x the torch composite's time at K=1, 1.04-1.08x at K=8.
# Two threads, idle machine (2026-12-04): 0.79x, 0.86x, 0.87x, and 1.10x at d_out=512, K=1
# (within the composite's IQR); the whole engine took 0.71-1.08x torch's time with it, at or
# below 1.0 in 7 of 8 comparisons (K = 1 and 8, eager or compiled backbone, two runs)
# (B=512, V=2, d_in=512, d_out in {128, 512}, float32, the 2-core AMD EPYC VM;
# bench/README.md). So the compiled op comes first; where
# it is not built, or fails its self-check, auto takes torch and says why once.
# Triton on CPU tensors runs in its interpreter, a test mode: never auto's choice.
# The CUDA kernels (SIMT, no tensor cores) come after Triton, whose tl.dot uses tensor cores
# for half precision; they serve where Triton is missing or fails its check. On an H200
# (bench/README.md, 2026-12-04) the three CUDA backends were within 15% of each other over
# the projection head's two layers, the ghost score a small part of a pass: the order stays.
_AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}

_logger = logging.getLogger(__name__)
_lock = threading.Lock()
_check_failures: dict[tuple[str, str], str | None] = {}  # (backend, device) -> why not, or None
_auto_choices: dict[str, str] = {}  # device -> backend


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _validate(
    h: torch.Tensor,
    delta: torch.Tensor,
    G_w: torch.Tensor,
    G_b: torch.Tensor | None,
    op: str = "ghost_score",
) -> None:
    """Raise ValueError/TypeError naming ``op``, the argument, what was expected and what was
    received. Shared by every face of the op (the Triton launcher passes its own name)."""
    named = {"h": h, "delta": delta, "G_w": G_w}
    if G_b is not None:
        named["G_b"] = G_b
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{op}: argument {name!r} must be a torch.Tensor; received "
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
                f"{op}: argument {name!r} must have {ndim} dimensions "
                f"{layouts[name]}; received shape {_shape(t)}"
            )
    B, V, d_in = h.shape
    d_out = delta.shape[2]
    K = G_w.shape[0]
    if delta.shape[:2] != (B, V):
        raise ValueError(
            f"{op}: argument 'delta' must have shape (B, V, d_out) with (B, V) = "
            f"{(B, V)} as in h {_shape(h)}; received {_shape(delta)}"
        )
    if G_w.shape[1:] != (d_out, d_in):
        raise ValueError(
            f"{op}: argument 'G_w' must have shape (K, d_out, d_in) with (d_out, d_in) = "
            f"{(d_out, d_in)} from delta {_shape(delta)} and h {_shape(h)}; received {_shape(G_w)}"
        )
    if G_b is not None and G_b.shape != (K, d_out):
        raise ValueError(
            f"{op}: argument 'G_b' must have shape (K, d_out) = {(K, d_out)}; "
            f"received {_shape(G_b)}"
        )
    if not h.dtype.is_floating_point:
        raise ValueError(
            f"{op}: argument 'h' must have a floating-point dtype; received {h.dtype}"
        )
    for name, t in named.items():
        if t.dtype != h.dtype:
            raise ValueError(
                f"{op}: argument {name!r} must have dtype {h.dtype} like h; "
                f"received {t.dtype}"
            )
        if t.device != h.device:
            raise ValueError(
                f"{op}: argument {name!r} must be on device {h.device} like h; "
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


def _triton_kernels():
    """The module ``ffengine.kernels.ghost_score`` and None, or None and why it won't import."""
    try:
        from ffengine.kernels import ghost_score as kernels
    except Exception as e:  # ImportError, or Triton failing to initialize: either way, unusable
        return None, (
            f"cannot import ffengine.kernels.ghost_score ({type(e).__name__}: {e}); "
            "it needs Triton (pip install triton)"
        )
    return kernels, None


def _ghost_score_triton(
    h: torch.Tensor, delta: torch.Tensor, G_w: torch.Tensor, G_b: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused Triton kernels; float32 results cast to the input dtype."""
    kernels, reason = _triton_kernels()
    if kernels is None:
        raise BackendUnavailableError(f"ghost_score backend 'triton' cannot run: {reason}")
    dots, sqnorm = kernels.ghost_score_triton(h, delta, G_w, G_b)
    return dots.to(h.dtype), sqnorm.to(h.dtype)


def _triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` at all (before any self-check)."""
    kernels, reason = _triton_kernels()
    if kernels is None:
        return reason
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        if kernels.interpreted():
            return (
                "TRITON_INTERPRET=1 was set when ffengine.kernels.ghost_score was imported, so "
                "the kernels run in the CPU interpreter; unset it and restart the process"
            )
        return None
    if device.type == "cpu":
        interpret_now = os.environ.get("TRITON_INTERPRET", "") == "1"
        if kernels.interpreted():
            if interpret_now:
                return None
            return (
                "TRITON_INTERPRET was unset after ffengine.kernels.ghost_score was imported "
                "under it; Triton's interpreter needs it for the life of the process"
            )
        if interpret_now:
            return (
                "TRITON_INTERPRET=1 was set after ffengine.kernels.ghost_score was imported "
                "(Triton reads it when a kernel is defined); set it at process start"
            )
        return (
            "Triton needs CUDA tensors; CPU tensors run only in its interpreter "
            "(set TRITON_INTERPRET=1 at process start: a slow test mode)"
        )
    return f"Triton does not run on {device.type} tensors"


_FAST_BACKENDS = ("cpu", "triton", "cuda")  # the ones that need a self-check


def _ghost_score_cuda(
    h: torch.Tensor, delta: torch.Tensor, G_w: torch.Tensor, G_b: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA kernels; results (float32, or float64 for float64) cast to the input dtype."""
    from ffengine.ops import cuda_ext

    dots, sqnorm = cuda_ext.ghost_score_cuda(h.detach(), delta.detach(), G_w.detach(),
                                             None if G_b is None else G_b.detach())
    return dots.to(h.dtype), sqnorm.to(h.dtype)


def _cuda_unavailable(device: torch.device) -> str | None:
    """Why the CUDA kernels cannot run on ``device`` at all (before any self-check)."""
    if device.type != "cuda":
        return f"the CUDA kernels take CUDA tensors, not {device.type} tensors"
    from ffengine.ops import cuda_ext

    return cuda_ext.unavailable_reason()


def _run_fast(
    backend: str,
    h: torch.Tensor,
    delta: torch.Tensor,
    G_w: torch.Tensor,
    G_b: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "cpu":
        return _ghost_score_cpu(h, delta, G_w, G_b)
    if backend == "cuda":
        return _ghost_score_cuda(h, delta, G_w, G_b)
    return _ghost_score_triton(h, delta, G_w, G_b)


def _unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` at all (before any self-check), or None."""
    if backend == "cpu":
        return None if _ext.load_extension() is not None else _ext.unavailable_reason()
    if backend == "cuda":
        return _cuda_unavailable(device)
    return _triton_unavailable(device)


def _run_self_check(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` must not be trusted on ``device``, or None.

    Tiny odd-sized inputs, with and without bias, compared with the torch backend evaluated
    in float64 on the same (rounded) inputs.
    """
    problem = _unavailable(backend, device)
    if problem is not None:
        return problem
    cases = [(torch.float64, 1e-10), (torch.float32, 1e-4)]
    if backend == "triton":
        cases = cases[1:]  # the kernels take float32 and half precision, not float64
    gen = torch.Generator().manual_seed(0)
    for dtype, rtol in cases:
        for with_bias in (True, False):
            shapes = ((3, 2, 7), (3, 2, 5), (2, 5, 7), (2, 5))
            inputs = [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in shapes]
            h, delta, G_w, G_b = (t.to(device=device, dtype=dtype) for t in inputs)
            G_b = G_b if with_bias else None
            try:
                got = _run_fast(backend, h, delta, G_w, G_b)
            except Exception as e:  # any failure means: do not trust this backend
                return f"self-check raised {type(e).__name__}: {e}"
            want = ghost_score_torch(
                h.double(), delta.double(), G_w.double(), None if G_b is None else G_b.double()
            )
            for name, g, w in zip(("dots", "sqnorm"), got, want, strict=True):
                if g.dtype != dtype or g.shape != w.shape or g.device != w.device:
                    return (
                        f"self-check failed: {name} ({dtype}, bias={with_bias}) came back as "
                        f"{g.dtype} {_shape(g)} on {g.device}; expected {dtype} {_shape(w)} "
                        f"on {w.device}"
                    )
                scale = float(w.abs().max())
                err = float((g.double() - w).abs().max())
                if not err <= rtol * scale:
                    return (
                        f"self-check failed: {name} ({dtype}, bias={with_bias}) differs "
                        f"from the torch backend by {err:.3g} (scale {scale:.3g}, "
                        f"rtol {rtol:g})"
                    )
    return None


def _self_check(backend: str, device: torch.device) -> str | None:
    """Cached ``_run_self_check``: once per process, backend and device."""
    if backend == "cpu":
        device = torch.device("cpu")  # the compiled op only ever runs on the CPU
    key = (backend, str(device))
    with _lock:
        if key in _check_failures:
            return _check_failures[key]
    failure = _run_self_check(backend, device)
    with _lock:
        _check_failures.setdefault(key, failure)
        return _check_failures[key]


def _auto_backend(device: torch.device) -> str:
    key = str(device)
    with _lock:
        if key in _auto_choices:
            return _auto_choices[key]
    skipped = []
    choice = "torch"
    for candidate in _AUTO_PREFERENCE.get(device.type, ("torch",)):
        if candidate == "torch":
            break
        failure = _self_check(candidate, device)
        if failure is None:
            choice = candidate
            break
        skipped.append(f"{candidate!r}: {failure}")
    with _lock:
        first = key not in _auto_choices
        choice = _auto_choices.setdefault(key, choice)
    if skipped and first:
        _logger.warning(
            "ghost_score backend 'auto' on %s: not using %s; falling back to %r",
            device,
            "; ".join(skipped),
            choice,
        )
    return choice


def _as_device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _resolve(name: str | None, device: torch.device) -> tuple[str, bool]:
    """(concrete backend, whether it was chosen by auto) for inputs on ``device``."""
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
        return _auto_backend(device), True
    if key in _FAST_BACKENDS:
        failure = _self_check(key, device)
        if failure is not None:
            where = "" if key == "cpu" else f" on {device}"
            raise BackendUnavailableError(
                f"ghost_score backend {key!r} (from {source}) cannot run{where}: {failure}; "
                "use backend='torch' instead"
            )
    return key, False


def resolve_backend(name: str | None = None, device: torch.device | str | None = None) -> str:
    """The concrete backend ("torch", "cpu", "triton" or "cuda") ``ghost_score`` would use
    for ``name`` on inputs that live on ``device`` (default: the CPU).

    ``name`` beats the ``FFENGINE_BACKEND`` variable, which beats auto; ``None`` and "auto"
    mean "not chosen". Raises BackendUnavailableError for an unknown name or a named backend
    that cannot run on ``device``, with the reason.
    """
    return _resolve(name, _as_device(device))[0]


def _needs_grad(tensors: list[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _cpu_input_problem(tensors: list[torch.Tensor]) -> str | None:
    h = tensors[0]
    if h.device.type != "cpu":
        return f"inputs are on {h.device}, the cpu backend needs CPU tensors"
    if h.dtype not in _CPU_DTYPES:
        return f"inputs have dtype {h.dtype}, the cpu backend supports float32 and float64"
    if _needs_grad(tensors):
        return "inputs require grad and the cpu backend is not differentiable"
    return None


def _triton_input_problem(tensors: list[torch.Tensor]) -> str | None:
    h = tensors[0]
    if h.dtype not in _TRITON_DTYPES:
        return (
            f"inputs have dtype {h.dtype}, the triton backend supports float32, bfloat16 "
            "and float16"
        )
    if _needs_grad(tensors):
        return "inputs require grad and the triton backend is not differentiable"
    kernels, _ = _triton_kernels()
    if kernels is not None and h.shape[1] > kernels.MAX_VIEWS:
        return f"V = {h.shape[1]} views, the triton backend takes at most {kernels.MAX_VIEWS}"
    return None


def _cuda_input_problem(tensors: list[torch.Tensor]) -> str | None:
    h = tensors[0]
    if h.device.type != "cuda":
        return f"inputs are on {h.device}, the cuda backend needs CUDA tensors"
    if h.dtype not in _CUDA_DTYPES:
        return (
            f"inputs have dtype {h.dtype}, the cuda backend supports float32, float64, "
            "bfloat16 and float16"
        )
    if _needs_grad(tensors):
        return "inputs require grad and the cuda backend is not differentiable"
    return None


_INPUT_PROBLEMS = {
    "cpu": _cpu_input_problem,
    "triton": _triton_input_problem,
    "cuda": _cuda_input_problem,
}


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
        backend: "auto", "torch", "cpu", "triton", "cuda", or None:
            see the module docstring; auto decides for the inputs' device. When auto picks a
            backend that does not suit the inputs (wrong dtype, or needing autograd),
            "torch" runs instead.

    Returns:
        ``(dots (B, K), sqnorm (B,))`` in the input dtype, on the input device. (The Triton
        kernels accumulate in float32; for their float32 results on half-precision inputs,
        call ``ffengine.kernels.ghost_score.ghost_score_triton`` directly.)

    Raises:
        ValueError, TypeError: bad shapes, dtypes or devices (the message names the argument).
        BackendUnavailableError: unknown backend, or a named backend that cannot run here.
    """
    _validate(h, delta, G_w, G_b)
    chosen, by_auto = _resolve(backend, h.device)
    if chosen in _FAST_BACKENDS:
        tensors = [h, delta, G_w] + ([] if G_b is None else [G_b])
        problem = _INPUT_PROBLEMS[chosen](tensors)
        if problem is None:
            return _run_fast(chosen, h, delta, G_w, G_b)
        if not by_auto:
            raise BackendUnavailableError(
                f"ghost_score backend {chosen!r} cannot run on these inputs: {problem}; "
                "use backend='torch'"
            )
    return ghost_score_torch(h, delta, G_w, G_b)


def _reset_backend_cache() -> None:
    """Forget the cached self-checks and auto choices (tests only)."""
    with _lock:
        _check_failures.clear()
        _auto_choices.clear()
