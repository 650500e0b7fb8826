"""Do traces of the same run, data and instances agree? Flagged ids and scores against a
reference trace (another backend, device or precision).

    python bench/compare_traces.py REF_TRACE TRACE [TRACE ...] [--json]

For each TRACE: its backend and device (from ``summary.json`` / ``metadata.json``), how many
it flags, whether its flagged ids are the reference's (and how many differ each way), and
the largest difference of its per-sample scores (``scores.npy``) and of the scores the MAD rule
reads (``detection_scores.npy``) from the reference's, scaled by the reference's largest
magnitude; skipped samples (NaN) must be the same. Prints a table on stderr and, with
``--json``, one JSON object on stdout. Exit status 1 where a trace flags other ids, skips
other samples or cannot be read (a trace that did not finish).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _scaled_diff(a: np.ndarray, ref: np.ndarray) -> float:
    ok = ~np.isnan(ref)
    if not ok.any():
        return 0.0
    return float(np.abs(a[ok].astype(np.float64) - ref[ok]).max() / max(
        float(np.abs(ref[ok]).max()), 1e-300))


def _read(path: Path) -> dict:
    summary = json.loads((path / "summary.json").read_text())
    meta = json.loads((path / "metadata.json").read_text())
    return {"summary": summary, "meta": meta,
            "flagged": np.sort(np.load(path / "flagged.npy")),
            "scores": np.load(path / "scores.npy"),
            "detection": np.load(path / "detection_scores.npy")}


def compare(reference: Path, traces: list[Path]) -> dict:
    ref = _read(reference)
    rows = []
    for path in traces:
        try:
            t = _read(path)
        except OSError as e:  # a trace that did not finish: reported, the others still read
            rows.append({"trace": str(path), "error": f"{type(e).__name__}: {e}"})
            continue
        if t["scores"].shape != ref["scores"].shape:
            raise SystemExit(f"{path}: scores of shape {t['scores'].shape}, the reference's "
                             f"are {ref['scores'].shape}: not the same data and instances")
        same_nan = bool(np.array_equal(np.isnan(t["scores"]), np.isnan(ref["scores"])))
        rows.append({
            "trace": str(path),
            "backend": t["summary"].get("backend"),
            "device": t["meta"].get("options", {}).get("device_type"),
            "n_flagged": int(len(t["flagged"])),
            "same_flagged": bool(np.array_equal(t["flagged"], ref["flagged"])),
            "only_here": int(len(np.setdiff1d(t["flagged"], ref["flagged"]))),
            "only_in_reference": int(len(np.setdiff1d(ref["flagged"], t["flagged"]))),
            "same_skipped": same_nan,
            "scores_scaled_diff": _scaled_diff(t["scores"], ref["scores"]),
            "detection_scaled_diff": _scaled_diff(t["detection"], ref["detection"]),
        })
    return {"reference": {"trace": str(reference), "backend": ref["summary"].get("backend"),
                          "n_flagged": int(len(ref["flagged"]))},
            "traces": rows,
            "all_agree": all(r.get("same_flagged") and r.get("same_skipped") for r in rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("reference", type=Path)
    p.add_argument("traces", type=Path, nargs="+")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    res = compare(a.reference, a.traces)
    r0 = res["reference"]
    print(f"reference {r0['trace']} ({r0['backend']}): {r0['n_flagged']} flagged",
          file=sys.stderr)
    for r in res["traces"]:
        if "error" in r:
            print(f"  {r['trace']}: unreadable ({r['error']})", file=sys.stderr)
            continue
        print(f"  {r['trace']} ({r['backend']}): {r['n_flagged']} flagged, "
              f"{'same ids' if r['same_flagged'] else 'OTHER ids'} (+{r['only_here']} "
              f"-{r['only_in_reference']}), skipped {'same' if r['same_skipped'] else 'OTHER'}"
              f", scores differ by {r['scores_scaled_diff']:.2g} (detection "
              f"{r['detection_scaled_diff']:.2g}) of the reference's largest", file=sys.stderr)
    if a.json:
        print(json.dumps(res, sort_keys=True))
    return 0 if res["all_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
