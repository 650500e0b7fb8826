"""Experiment: does the domain verdict still find the attack when the poisons are hosted on
benign domains among clean images, instead of on attacker domains that hold nothing else?

    python bench/experiments/domain_spread.py [CONFIG ...]

In the harness's data every poison sits on one of two attacker domains with no clean image,
so the verdict (``ffengine.report.domain_table``: a binomial test of each domain's flag count
against the other domains' rate, Bonferroni-corrected, and at least twice their rate) only
has to see that the flags concentrate there. Domains are metadata: they do not change
pre-training or the scores, so rehosting the poisons needs no new run. This reads the
committed per-sample scores (``bench/results/scores/<config>.npz``; by default every
SimCLR configuration where the attack took), flags with the default method, and moves every
poison onto m of the 8 benign domains (uniformly at random, 20 draws per m; m = 1 is each
benign domain in turn). Prints, per m, how many of the poison-hosting domains the verdict
calls suspicious (mean over draws, of m), in how many draws it finds all of them, and how
many domains without a poison it calls suspicious (mean).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from detection import METHODS, SCORES_DIR, load_results, load_scores  # noqa: E402

from ffengine.detect import flag  # noqa: E402
from ffengine.methods import DEFAULT_METHOD  # noqa: E402
from ffengine.report import domain_table  # noqa: E402

HOSTS = (1, 2, 3, 4, 8)
DRAWS = 20


def verdict(flagged: np.ndarray, domains: np.ndarray, names: list[str],
            hosts: set[int]) -> tuple[int, int]:
    """(poison-hosting domains called suspicious, domains without poisons called so)."""
    rows = domain_table(flagged, domains, names)
    index = {name: i for i, name in enumerate(names)}
    found = sum(r["suspicious"] for r in rows if index[r["domain"]] in hosts)
    return found, sum(r["suspicious"] for r in rows if index[r["domain"]] not in hosts)


def rehost(domains: np.ndarray, poisoned: np.ndarray, hosts: np.ndarray,
           rng: np.random.Generator) -> np.ndarray:
    """Each poison moved onto one of ``hosts`` (uniformly at random)."""
    out = domains.copy()
    out[poisoned] = rng.choice(hosts, size=int(poisoned.sum()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*")
    a = p.parse_args(argv)
    took = {r["config"] for r in load_results()["rows"]
            if r["took"] and r["method"] == DEFAULT_METHOD}
    configs = a.configs or sorted(c.stem for c in SCORES_DIR.glob("*.npz") if c.stem in took)
    k = METHODS[DEFAULT_METHOD].k
    for c in configs:
        saved = load_scores(c)
        if DEFAULT_METHOD not in saved["scores"]:
            continue
        poisoned = saved["poisoned"].astype(bool)
        domains = saved["domains"].astype(np.int64)
        names = [str(x) for x in saved["domain_names"]]
        flagged = flag(saved["scores"][DEFAULT_METHOD], k)
        attacker = set(np.unique(domains[poisoned]).tolist())
        benign = np.array(sorted(set(range(len(names))) - attacker))
        found, other = verdict(flagged, domains, names, attacker)
        print(f"{c}: as generated, {found} of {len(attacker)} attacker domains found, "
              f"{other} others called suspicious")
        rng = np.random.default_rng(0)
        for m in HOSTS:
            trials = ([benign[[j]] for j in range(len(benign))] if m == 1 else
                      [rng.choice(benign, size=m, replace=False) for _ in range(DRAWS)])
            res = [verdict(flagged, rehost(domains, poisoned, h, rng), names, set(h.tolist()))
                   for h in trials]
            f = np.array([r[0] for r in res])
            print(f"  poisons on {m} benign domain(s): {f.mean():.2f} of {m} found, all found "
                  f"in {(f == m).sum()} of {len(res)}, others called suspicious "
                  f"{np.mean([r[1] for r in res]):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
