"""Check: does the current domain verdict give the committed rows' domain counts?

    python bench/experiments/domain_verdict_recheck.py [CONFIG ...]

The rows in ``bench/results/detection.json`` were made with the domain verdict of their day
(a one-pass binomial test before the step-down Fisher test of 2026-12-03). For every row
whose configuration has committed per-sample scores (``bench/results/scores/<config>.npz``),
this flags the method's scores with its MAD k, runs today's ``ffengine.report.domain_table``
and compares the attacker domains found and the benign domains called with the row's.
Attacker domains are the domains that hold poisons. Prints one line per row and a tally;
exits 1 if any row differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from detection import METHODS, load_results, load_scores, scored_configs  # noqa: E402

from ffengine.detect import flag  # noqa: E402
from ffengine.report import domain_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*")
    a = p.parse_args(argv)
    rows = load_results()["rows"]
    configs = a.configs or scored_configs(took_only=False)
    same = differ = 0
    for c in configs:
        saved = load_scores(c)
        names = [str(x) for x in saved["domain_names"]]
        attacker = {names[d] for d in np.unique(saved["domains"][saved["poisoned"].astype(bool)])}
        for r in (r for r in rows if r["config"] == c and r["method"] in saved["scores"]):
            table = domain_table(flag(saved["scores"][r["method"]], METHODS[r["method"]].k),
                                 saved["domains"], names)
            called = {t["domain"] for t in table if t["suspicious"]}
            now = (len(called & attacker), len(called - attacker))
            then = (r["domains_attacker_flagged"], r["domains_benign_flagged"])
            same, differ = same + (now == then), differ + (now != then)
            print(f"{c} {r['method']}: attacker {now[0]}/{len(attacker)}, benign {now[1]} "
                  f"(row: {then[0]}, {then[1]}){'' if now == then else '  DIFFERS'}")
    print(f"{same} rows agree, {differ} differ, over {len(configs)} configurations")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
