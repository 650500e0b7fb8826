"""Human-facing outputs of a detection run: the score histogram figure and per-domain table.

The figure is drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot,
no GUI backend, no global state) and written atomically. Histograms are accumulated chunk by
chunk with fixed bin edges, so memmapped score files of any size can be plotted.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ffengine.detect.domains import domain_suspicion
from ffengine.errors import ConfigError, DataError
from ffengine.io_utils import atomic_write_bytes

__all__ = ["domain_table", "format_domain_table", "plot_score_distribution",
           "reference_class_share", "format_reference_class_share"]

_CHUNK = 1 << 22
_CLEAN_COLOR = "#4C72B0"
_POISON_COLOR = "#C44E52"


def _finite_range(scores: np.ndarray) -> tuple[float, float, int, int]:
    lo, hi, n_nan, n_inf = np.inf, -np.inf, 0, 0
    for start in range(0, scores.shape[0], _CHUNK):
        c = np.asarray(scores[start : start + _CHUNK], np.float64)
        fin = np.isfinite(c)
        n_nan += int(np.isnan(c).sum())
        n_inf += int(np.isinf(c).sum())
        if fin.any():
            lo, hi = min(lo, float(c[fin].min())), max(hi, float(c[fin].max()))
    return lo, hi, n_nan, n_inf


def plot_score_distribution(
    scores: np.ndarray,
    threshold: float,
    path: str | os.PathLike[str],
    truth_ids: Sequence[int] | np.ndarray | None = None,
    title: str | None = None,
    *,
    bins: int = 100,
    cut: float | None = None,
) -> Path:
    """Histogram of ``scores`` (shape ``(n,)``, log-scaled counts) with the threshold line.

    ``cut``: a second threshold in use above the first, drawn as its own line (the trace's
    ``--threshold mad-split`` passes Otsu's cut of the MAD-flagged scores where it applied).

    With ``truth_ids`` the poisoned and clean samples are drawn in separate colours (as in
    Figure 2 of the FoundationForensics paper). NaN and infinite scores cannot be placed on
    the axis: they are left out and their number is noted in the legend. The format follows
    the suffix of ``path`` (``.png``, ``.pdf``, ``.svg``); the file is written atomically.
    Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scores = scores if isinstance(scores, np.ndarray) else np.asarray(scores)
    if scores.ndim != 1 or scores.shape[0] == 0:
        raise DataError(f"scores must be a non-empty 1-D array; received shape {scores.shape}")
    if int(bins) < 1:
        raise ConfigError(f"bins must be >= 1; received {bins}")
    n = scores.shape[0]
    lo, hi, n_nan, n_inf = _finite_range(scores)
    thr = float(threshold)
    if not np.isfinite(lo):  # no finite score at all: draw an empty axis around the threshold
        lo, hi = (thr, thr) if np.isfinite(thr) else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, int(bins) + 1)

    def hist_of(values: np.ndarray) -> np.ndarray:
        v = values[np.isfinite(values)]
        return np.histogram(v, bins=edges)[0].astype(np.int64)

    total = np.zeros(int(bins), np.int64)
    for start in range(0, n, _CHUNK):
        total += hist_of(np.asarray(scores[start : start + _CHUNK], np.float64))

    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    centers = (edges[:-1] + edges[1:]) / 2
    if truth_ids is not None:
        truth = np.unique(np.asarray(truth_ids, np.int64))
        if truth.size and (truth[0] < 0 or truth[-1] >= n):
            raise DataError(f"truth_ids must lie in [0, {n}); received ids up to {truth[-1]}")
        poison = hist_of(np.asarray(scores[truth], np.float64))
        clean = total - poison
        ax.hist(centers, bins=edges, weights=clean, color=_CLEAN_COLOR, alpha=0.75,
                label=f"clean ({n - truth.size})")
        ax.hist(centers, bins=edges, weights=poison, color=_POISON_COLOR, alpha=0.75,
                label=f"poisoned ({truth.size})")
    else:
        ax.hist(centers, bins=edges, weights=total, color=_CLEAN_COLOR, alpha=0.85,
                label=f"all ({n})")
    ax.axvline(thr, color="black", linestyle="--", linewidth=1.2, label=f"threshold {thr:.4g}")
    if cut is not None:
        ax.axvline(float(cut), color="black", linestyle=":", linewidth=1.4,
                   label=f"split cut {float(cut):.4g}")
    if n_nan or n_inf:
        ax.plot([], [], " ", label=f"not shown: {n_nan} NaN, {n_inf} inf")
    if total.any():  # a log axis needs a positive count (all-NaN input has none)
        ax.set_yscale("log", nonpositive="clip")
    ax.set_xlabel("score")
    ax.set_ylabel("number of samples (log)")
    if title:
        ax.set_title(title)
    ax.legend(frameon=False, fontsize="small")
    fig.tight_layout()

    dest = Path(path)
    fmt = dest.suffix.lstrip(".").lower() or "png"
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    return atomic_write_bytes(dest, buf.getvalue())


def domain_table(
    flagged_ids: Sequence[int] | np.ndarray,
    domain_ids: Sequence[int] | np.ndarray,
    domain_names: Sequence[str] | Mapping[int, str],
    alpha: float = 0.01,
    min_ratio: float = 2.0,
    skipped_ids: Sequence[int] | np.ndarray = (),
) -> list[dict[str, Any]]:
    """Per-domain flag counts and the domain-level verdict, most suspicious first.

    ``domain_ids`` (shape ``(n,)``) gives each sample's domain index into ``domain_names``.
    Rows ``{"domain", "flagged", "total", "rate", "ratio", "p_value", "suspicious"}``
    (``rate = flagged / total``; ``ratio``: the rate over the baseline's (the other domains
    not called suspicious), None where this domain has flags and the baseline none, 1.0
    where neither has any; ``p_value`` and ``suspicious``: the stepped-down Fisher exact
    test of :func:`ffengine.detect.domains.domain_suspicion` against that baseline)
    for every domain with at least one sample, sorted suspicious first, then by p-value
    (ascending), rate (descending) and name. A p-value, not a count, orders the table: a
    large benign domain collects many false positives by its size alone.

    ``skipped_ids``: samples that were never scored (undecodable), so could not be flagged:
    they leave ``total`` (the test's denominator) and are counted in each row's ``skipped``.
    """
    dom = np.asarray(domain_ids)
    if dom.ndim != 1 or (dom.size and dom.dtype.kind not in "iu"):
        raise DataError(f"domain_ids must be 1-D integers; received {dom.dtype} {dom.shape}")
    dom = dom.astype(np.int64)
    names = dict(domain_names) if isinstance(domain_names, Mapping) else dict(
        enumerate(domain_names))
    n_dom = max(names, default=-1) + 1
    if dom.size and (dom.min() < 0 or dom.max() >= n_dom or not np.isin(dom, list(names)).all()):
        raise DataError("domain_ids refer to domains without a name in domain_names")
    flagged = np.asarray(flagged_ids)
    if flagged.size:
        if flagged.dtype.kind not in "iu":
            raise DataError(f"flagged_ids must be integers; received dtype {flagged.dtype}")
        flagged = flagged.astype(np.int64)
        if flagged.min() < 0 or flagged.max() >= dom.shape[0]:
            raise DataError(f"flagged_ids must lie in [0, {dom.shape[0]})")
        if np.unique(flagged).shape[0] != flagged.shape[0]:
            raise DataError("flagged_ids has duplicated ids")
    else:
        flagged = np.zeros(0, np.int64)
    skipped = np.unique(np.asarray(skipped_ids, dtype=np.int64))
    if skipped.size and (skipped.min() < 0 or skipped.max() >= dom.shape[0]):
        raise DataError(f"skipped_ids must lie in [0, {dom.shape[0]})")
    if np.isin(flagged, skipped).any():
        raise DataError("a skipped (unscored) sample cannot be flagged")
    n_skipped = np.bincount(dom[skipped], minlength=n_dom)
    totals = np.bincount(dom, minlength=n_dom) - n_skipped
    hits = np.bincount(dom[flagged], minlength=n_dom)
    test = domain_suspicion(hits, totals, alpha, min_ratio)
    rows = [
        {"domain": str(names[d]), "flagged": int(hits[d]), "total": int(totals[d]),
         "rate": float(hits[d] / totals[d]) if totals[d] else 0.0,
         "ratio": _finite_or_none(test["ratio"][d]),
         "p_value": float(test["p_value"][d]), "suspicious": bool(test["suspicious"][d]),
         "skipped": int(n_skipped[d])}
        for d in sorted(names) if totals[d] + n_skipped[d] > 0
    ]
    rows.sort(key=lambda r: (not r["suspicious"], r["p_value"], -r["rate"], r["domain"]))
    return rows


def _finite_or_none(x: float) -> float | None:
    """JSON has no Infinity: a rate over zero others' flags becomes null."""
    return float(x) if np.isfinite(x) else None


def format_domain_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Fixed-width text table of :func:`domain_table` rows (rate as a percentage; ``×others``:
    the rate over the baseline's; ``p``: the Fisher exact test's p-value; ``verdict``:
    ``SUSPICIOUS`` or ``-``)."""
    header = ("domain", "flagged", "total", "rate", "×others", "p", "verdict")
    cells = [(str(r["domain"]), str(int(r["flagged"])), str(int(r["total"])),
              f"{100.0 * float(r['rate']):.2f}%",
              "inf" if r["ratio"] is None else f"{float(r['ratio']):.2f}",
              f"{float(r['p_value']):.1e}", "SUSPICIOUS" if r["suspicious"] else "-")
             for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(header)]

    def line(c: Sequence[str]) -> str:
        first = c[0].ljust(widths[0])
        rest = "  ".join(v.rjust(w) for v, w in zip(c[1:], widths[1:], strict=True))
        return f"{first}  {rest}".rstrip()

    sep = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([line(header), sep, *(line(c) for c in cells)]) + "\n"


def reference_class_share(flagged_ids: Sequence[int] | np.ndarray, labels: np.ndarray,
                          reference_labels: Sequence[int],
                          skipped_ids: Sequence[int] | np.ndarray = ()) -> dict[str, Any] | None:
    """How much of the flagged set carries the class of a reference input x_r.

    Clean images of x_r's class raise cos(f(x_b), f(x_r)) too, and are the method's usual
    false positives (docs/RESULTS.md): where the index has labels, the user should see how
    many of the flagged inputs they are. ``labels`` (n,), -1 for none; ``reference_labels``:
    the instances' ``x_r_label`` values (negative ones, e.g. an optimized x_r, are ignored).
    None when no reference class is known or no scored input carries one. Otherwise
    ``{"labels", "flagged", "total", "rate", "flagged_other", "total_other", "rate_other",
    "share"}``: flagged / scored inputs of those classes, of the other labelled inputs, and
    the share of the flagged set that carries a reference class.
    """
    ref = sorted({int(v) for v in reference_labels if int(v) >= 0})
    labels = np.asarray(labels)
    scored = np.ones(labels.shape[0], dtype=bool)
    scored[np.asarray(skipped_ids, dtype=np.int64)] = False
    in_ref = np.isin(labels, ref) & scored
    other = (labels >= 0) & ~np.isin(labels, ref) & scored
    if not ref or not in_ref.any():
        return None
    hit = np.zeros(labels.shape[0], dtype=bool)
    hit[np.asarray(flagged_ids, dtype=np.int64)] = True
    n_ref, n_other = int((hit & in_ref).sum()), int((hit & other).sum())
    return {"labels": ref, "flagged": n_ref, "total": int(in_ref.sum()),
            "rate": n_ref / int(in_ref.sum()),
            "flagged_other": n_other, "total_other": int(other.sum()),
            "rate_other": n_other / int(other.sum()) if other.any() else None,
            "share": n_ref / int(hit.sum()) if hit.any() else 0.0}


def format_reference_class_share(share: Mapping[str, Any]) -> str:
    """One paragraph on :func:`reference_class_share`'s figures, for the trace's output."""
    labels = ", ".join(str(v) for v in share["labels"])
    other = ("" if share["rate_other"] is None else
             f", against {100.0 * share['rate_other']:.1f}% of the other labelled inputs")
    return (f"{share['flagged']} of the flagged inputs ({100.0 * share['share']:.0f}%) carry "
            f"label {labels}, the class of x_r: {100.0 * share['rate']:.1f}% of that class is "
            f"flagged{other}. Clean images of x_r's class raise cos(f(x_b), f(x_r)) too and "
            "are the method's usual false positives; weigh them with the domain verdict.")
