"""Experiment: which clean classes does a method flag? Per-class flag rates of clean inputs.

    python bench/experiments/class_flag_rates.py [--method last-max16x5-k6] [CONFIG ...]

Reads the per-sample scores the harness commits (``bench/results/scores/<config>.npz``; every
SimCLR configuration there where the attack took, unless configurations are named) and
flags with the method's MAD rule (its k). For each configuration: the flag rate of the clean
inputs of every CIFAR-10 class, the target class marked, and the rate of the target's
nearest class in the taxonomy the pre-registration names (truck <-> automobile) against
the other non-target classes together. Written for docs/PREREGISTRATION.md's session-20
prediction (a): with automobile the target, the clean trucks are flagged more often than
the other eight non-target classes together.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from detection import METHODS, load_scores, scored_configs  # noqa: E402

from ffengine.detect import flag  # noqa: E402

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
NEAREST = {1: 9, 9: 1}  # automobile <-> truck


def target_of(config: str) -> int:
    """The target class in a configuration's name (``...-t9-...``)."""
    return int(next(p for p in config.split("-") if p[0] == "t" and p[1:].isdigit())[1:])


def class_rates(config: str, method: str) -> dict:
    d = load_scores(config)
    flagged = np.zeros(len(d["labels"]), dtype=bool)
    flagged[flag(d["scores"][method], METHODS[method].k)] = True
    clean = ~d["poisoned"]
    target = target_of(config)
    rates = {c: float(flagged[clean & (d["labels"] == c)].mean()) for c in range(10)}
    out = {"config": config, "target": target, "rates": rates}
    if target in NEAREST:
        near = NEAREST[target]
        others = clean & ~np.isin(d["labels"], [target, near]) & (d["labels"] >= 0)
        out |= {"nearest": near, "nearest_rate": rates[near],
                "others_rate": float(flagged[others].mean())}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="last-max16x5-k6")
    p.add_argument("configs", nargs="*")
    a = p.parse_args(argv)
    configs = a.configs or [c for c in scored_configs() if "ffclip" not in c]
    print(f"{'config':45s} " + " ".join(f"{c[:6]:>6s}" for c in CLASSES)
          + "  nearest vs other non-target")
    for config in configs:
        r = class_rates(config, a.method)
        cells = [f"{r['rates'][c]:6.3f}" + ("*" if c == r["target"] else " ")
                 for c in range(10)]
        tail = (f"  {CLASSES[r['nearest']]} {r['nearest_rate']:.3f} vs {r['others_rate']:.3f}"
                if "nearest" in r else "")
        print(f"{config:45s} " + "".join(cells) + tail)
    print("(* the target class: x_r's class)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
