"""The backbone forward of a scoring pass, eager or through ``torch.compile``.

The backbone is nearly all of a trace's time on CPU (bench/README.md, "Engine throughput"),
and Inductor fuses its convolutions, batch norms and ReLUs into fewer passes over memory: on
the 2-core AMD EPYC dev machine it ran the demo's CIFAR ResNet 2.1-2.6x faster than NCHW
eager (batch 256, float32; bench/README.md), its outputs within 3e-7 relative of eager's. Since
the eager backbone went channels-last (1.3-1.5x faster on that CPU), the engine gains less
from compiling: 1.15-1.4x on the demo's model, 1.3-1.4x on ResNet-18 (2026-12-04). Since the
eager CPU backbone runs 64-view forwards with its batch norms folded (2026-12-04 evening:
much of what compiling saved was the kernel zeroing the pages of large activations),
compiling gains 0-2% on that CPU for a compile of 15-35 s, so ``"auto"`` runs eager on a
CPU. On a GPU the first call compiles too (Inductor's on-disk cache shortens later
processes), so ``"auto"`` compiles only a pass of at least :data:`AUTO_MIN_IMAGES` backbone
images there.

One compiled function serves every checkpoint's model (the model is an argument, so loading
another checkpoint does not compile again) and every batch size (``dynamic=True``). The first
compiled batch of each architecture, input dtype, device and autocast setting in a process is
checked against eager on the same input (later checkpoints of it run the same code with
other weights as inputs); an error or a mismatch falls back to eager for the rest of the
pass, with one warning that says why. A crash inside the compiled code cannot be caught
here; a trace is resumable, so it finishes with ``compile "off"``. (Compiled *training* of a
tiny odd-sized model crashed this torch build's Inductor code on CPU, 2026-12-04, which is
why pre-training does not compile; the inference graph ran clean in every run measured.)

The views that feed a compiled backbone come through a compiled colour stage too
(:class:`ColourRunner`: the augmentation's flip, colour jitter and grayscale,
:func:`ffengine.data.augment.colour_ops`). Eager, it is some fifty passes over the views'
memory; Inductor fuses them into a few, 2.7x faster on the dev CPU (one thread, 256 views,
2026-12-04), with pixels within 2e-6 of eager's. Same rules: checked against eager once per
process and setting, a failure or a mismatch falls back to eager with one warning.
"""

from __future__ import annotations

import warnings

import torch

from ..data.augment import AugmentConfig, colour_ops
from ..errors import ConfigError
from ..options import COMPILE_MODES, check_choice

# Backbone images (samples x views x draws x checkpoints) from which "auto" compiles. The
# compile costs 15-35 s once. Against the NCHW eager backbone it saved about 2 ms per image on
# one core of the dev machine (4.0 -> 1.7-2.0 ms), paying for itself from 10,000-20,000
# images; against channels-last eager (2026-12-04, two threads) it saves about 0.4 ms per image
# on the demo's model (from 40,000-90,000 images) and 2.3 ms on ResNet-18 (from 7,000-15,000).
# 50,000 stays: about break-even on the smallest model, a clear gain on larger ones. Since
# 2026-12-04 evening it applies on a GPU only: on the dev CPU the compiled engine ran 1.02x
# the eager one on the demo's model (rounds interleaved, bench/experiments/backbone_batch_ab.py)
# and 0.95-1.03x on ResNet-18 (bench/throughput.py), once the eager backbone ran 64-view
# forwards with folded batch norms.
AUTO_MIN_IMAGES = 50_000
# Largest |compiled - eager| / max|eager| accepted on the first batch: float32 outputs differ
# by ~3e-7 (operations fused in another order); bf16 autocast rounds at ~4e-3 per operation.
CHECK_RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}

_compiled = None  # one torch.compile'd function per process: its cache serves every model
_compiled_colour = None  # the same for the colour stage: its cache serves every batch size
_verified: set[tuple] = set()  # what the compiled functions were checked against eager for


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.features(x)


def resolve_compile(mode: str, images: int, compilable: bool, reference: bool,
                    device: torch.device | str = "cpu") -> bool:
    """Whether a pass of ``images`` backbone images on ``device`` runs compiled under
    ``mode``.

    ``compilable``: the objective's backbone can run through :class:`BackboneRunner`
    (SimCLR's; CLIP's visual tower is split into its own pieces and runs eager).
    ``reference``: the slow audit path, which "auto" keeps plain eager. "auto" compiles on
    a GPU only (see :data:`AUTO_MIN_IMAGES`).
    """
    check_choice("compile", mode, COMPILE_MODES)
    if mode == "off":
        return False
    if mode == "on":
        if not compilable:
            raise ConfigError("compile 'on' is available for SimCLR runs only (their backbone "
                              "is one module); use compile 'auto' or 'off'.")
        return True
    return (compilable and not reference and torch.device(device).type != "cpu"
            and images >= AUTO_MIN_IMAGES)


class _CheckedCompiled:
    """Runs one stage compiled when ``compiled`` is true: checked against eager on the first
    call of each setting in the process, and eager for the rest of the pass after an error
    or a mismatch (``fallback_reason`` says which)."""

    what = "the stage"  # named in the fallback warning

    def __init__(self, compiled: bool):
        self.compiled = compiled
        self.fallback_reason: str | None = None  # why a compiled runner went back to eager

    def _run(self, compiled_fn, eager_fn, key: tuple, *args) -> torch.Tensor:
        if not self.compiled:
            return eager_fn(*args)
        try:
            out = compiled_fn()(*args)
        except Exception as e:  # no C++ compiler, an unsupported op, ...: run eager instead
            self._fall_back(f"torch.compile failed ({type(e).__name__}: {e})")
            return eager_fn(*args)
        if key not in _verified:
            ref = eager_fn(*args)
            err = _relative_error(out, ref)
            tol = CHECK_RTOL.get(ref.dtype, CHECK_RTOL[torch.bfloat16])
            if not err <= tol:  # also catches NaN
                self._fall_back(f"{self.what}'s compiled output differs from eager's by "
                                f"{err:.3g} (relative; at most {tol:g} expected)")
                return ref
            _verified.add(key)
        return out

    def _fall_back(self, reason: str) -> None:
        self.compiled = False
        self.fallback_reason = reason
        warnings.warn(f"{reason}; {self.what} runs eager for the rest of this pass "
                      "(pass compile 'off' to skip the attempt).", RuntimeWarning, stacklevel=4)


class BackboneRunner(_CheckedCompiled):
    """``runner(model, x)`` = ``model.features(x)``, compiled when ``compiled`` is true."""

    what = "the backbone"

    def __call__(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._run(_compiled_features, _features, _check_key(model, x), model, x)


class ColourRunner(_CheckedCompiled):
    """``runner(x, u, cfg)`` = ``colour_ops(x, u, cfg)``, compiled when ``compiled`` is true:
    the ``colour`` argument of :func:`ffengine.data.augment.augment_batch`."""

    what = "the augmentation's colour stage"

    def __call__(self, x: torch.Tensor, u: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
        key = ("colour_ops", cfg, x.dtype, str(x.device))
        return self._run(_compiled_colour_ops, colour_ops, key, x, u, cfg)


def _check_key(model: torch.nn.Module, x: torch.Tensor) -> tuple:
    """What makes the compiled code another computation: the architecture (class and
    parameter shapes), the input's dtype and device, and the autocast setting."""
    shapes = tuple((n, tuple(p.shape), p.dtype) for n, p in model.named_parameters())
    amp = (torch.is_autocast_enabled(x.device.type)
           and torch.get_autocast_dtype(x.device.type))
    return type(model), shapes, x.dtype, str(x.device), amp


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float32, outside any autograd graph."""
    out, ref = out.detach().float(), ref.detach().float()
    scale = ref.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return float((out - ref).abs().max() / scale)


def _compiled_features():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_features, dynamic=True)
    return _compiled


def _compiled_colour_ops():
    global _compiled_colour
    if _compiled_colour is None:
        _compiled_colour = torch.compile(colour_ops, dynamic=True)
    return _compiled_colour
