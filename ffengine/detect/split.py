"""Otsu's split of a flagged set: a label-free refinement of the MAD rule (an experiment).

On a strongly backdoored run the poisons sit far above the clean scores' tail, and MAD with a
fixed k flags that tail too; on a weak one they sit inside it (docs/RESULTS.md, "At 150
epochs the threshold becomes the limit"). :func:`refine_by_split` splits the flagged scores
in two where the between-group variance peaks (Otsu's method) and keeps only the upper group
where the split is clear: its η, the between-group share of the flagged scores' variance,
reaches ``min_eta``. Elsewhere the MAD flags stay as they are.

Not a default: the gate ``OTSU_MIN_ETA`` was read off the runs it was picked on and is under
test on the runs traced since (docs/PREREGISTRATION.md, entry 4). The split is exact (a sort
of the flagged scores, float64 sums), so its memory is that of the flagged set, not of n.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from ffengine.io_utils import atomic_save_npy

__all__ = ["OTSU_MIN_ETA", "Split", "otsu_split", "refine_by_split", "refine_flagged_file"]

# pre-registered 2026-12-03 (docs/PREREGISTRATION.md, entry 4): 0.01 above the highest η, on
# the runs it was picked on, of a flagged set that splitting would have hurt
OTSU_MIN_ETA = 0.74


@dataclass(frozen=True)
class Split:
    """Otsu's cut of a flagged set, its η (0..1; 0 where there is nothing to split) and
    whether the refinement applied it (η at least the gate)."""

    threshold: float
    eta: float
    applied: bool

    def to_dict(self) -> dict:
        return asdict(self)


def otsu_split(x: np.ndarray) -> tuple[float, float]:
    """Otsu's threshold on 1-D scores, midway between the two sorted values where the
    between-group variance peaks (the first such place on ties), and its η. Fewer than two
    distinct values cannot be split: ``(max, 0.0)`` (``(inf, 0.0)`` when empty)."""
    x = np.sort(np.asarray(x, np.float64).ravel())
    n = len(x)
    if n < 2 or x[0] == x[-1]:
        return (float(x[-1]) if n else np.inf), 0.0
    i = np.arange(1, n)  # the lower group is x[:i]
    c = np.cumsum(x)[:-1]
    m0, m1 = c / i, (x.sum() - c) / (n - i)
    between = (i / n) * (1 - i / n) * (m0 - m1) ** 2
    best = int(np.argmax(between))
    return float((x[best] + x[best + 1]) / 2), float(between[best] / x.var())


def refine_by_split(scores: np.ndarray, flagged: np.ndarray,
                    min_eta: float = OTSU_MIN_ETA) -> tuple[np.ndarray, Split]:
    """The flagged ids (e.g. :func:`ffengine.detect.flag`'s) whose score is above Otsu's cut
    of the flagged scores, where the cut's η is at least ``min_eta``; otherwise ``flagged``
    unchanged. A set that cannot be split (η = 0) is always kept whole."""
    if not 0.0 <= min_eta <= 1.0:
        raise ValueError(f"min_eta must be in [0, 1] (a share of variance); received {min_eta}")
    flagged = np.asarray(flagged, np.int64)
    s = np.asarray(scores)[flagged]
    thr, eta = otsu_split(s)
    applied = eta > 0 and eta >= min_eta
    return (flagged[s > thr] if applied else flagged), Split(thr, eta, applied)


def refine_flagged_file(scores: str | os.PathLike[str], flagged: str | os.PathLike[str],
                        min_eta: float | None = None) -> Split:
    """:func:`refine_by_split` on a trace's files: ``flagged`` (a ``.npy`` of ids, as
    :func:`ffengine.detect.flag` writes it) is rewritten atomically with the refined ids;
    ``scores`` is read memory-mapped, only at the flagged ids. ``min_eta`` defaults to
    :data:`OTSU_MIN_ETA`."""
    ids = np.load(flagged)
    det = np.load(scores, mmap_mode="r")
    kept, split = refine_by_split(det, ids, OTSU_MIN_ETA if min_eta is None else min_eta)
    if split.applied:
        atomic_save_npy(flagged, kept)
    return split
