"""Named scoring methods: the options of ``Engine`` / ``ffengine trace`` that make one.

A method fixes which checkpoints are summed, how many augmentation draws each sample gets
and how they combine, how many backdoor instances are averaged, and the MAD multiplier.
``paper`` is FoundationForensics' Eq. 5 as written. The detection harness
(``bench/detection.py``) measures every method on the same cached runs; ``DEFAULT_METHOD``
names the one ``ffengine demo`` and ``ffengine trace`` use by default on SimCLR runs,
``DEFAULT_CLIP_METHOD`` the one on CLIP runs; each changes only when the grid in
docs/RESULTS.md shows a method helps across configurations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Method:
    checkpoints: str = "all"  # "all" or "last" (a list of epochs: Engine's own option)
    draws: int = 1
    aggregate: str = "mean"  # over draws: mean, max or median
    instances: int = 1  # backdoor instances, scores averaged (PE-I has one x_b: 1)
    k: float = 3.0
    # how checkpoints count besides their learning rate: "lr" (Eq. 5) or "rise" (by how much
    # cos(f(x_b), f(x_r)) rose since the previous checkpoint; Engine's ``weighting``)
    weighting: str = "lr"
    # how the instances' scores combine: "mean", or "min" (every instance must rise)
    combine: str = "mean"
    # how the flagged set is cut: "mad" (the paper's rule, with k), or "mad-split" (of the
    # MAD flags, those above Otsu's split where it is clear; trace's ``threshold``)
    threshold: str = "mad"

    def engine_options(self) -> dict:
        return {"checkpoints": self.checkpoints, "draws": self.draws,
                "aggregate": self.aggregate, "weighting": self.weighting,
                "combine": self.combine}

    def describe(self) -> str:
        ckpts = "every checkpoint" if self.checkpoints == "all" else "the last checkpoint"
        draws = "1 draw" if self.draws == 1 else f"{self.aggregate} over {self.draws} draws"
        inst = ("1 instance" if self.instances == 1
                else f"{self.combine} of {self.instances} instances")
        rise = ", weighted by the cosine's rise" if self.weighting == "rise" else ""
        split = ", then Otsu's split where clear" if self.threshold == "mad-split" else ""
        return f"{ckpts}{rise}, {draws}, {inst}, MAD k = {self.k:g}{split}"

    def to_dict(self) -> dict:
        return asdict(self)


METHODS: dict[str, Method] = {
    # Eq. 5 as written: every checkpoint, one draw, one instance, MAD k = 3
    "paper": Method(),
    # the final checkpoint, the max over 16 augmentation draws (a poison raises the cosine
    # only in draws whose two views fall on different halves of it), mean over 5 instances
    "last-max16x5": Method(checkpoints="last", draws=16, aggregate="max", instances=5),
    # the final checkpoint, one draw, mean over 5 instances: for CLIP, which scores one
    # fixed view, and whose cosine learning-rate schedule gives the first checkpoint
    # (before the backdoor formed) the largest weight in Eq. 5
    "last-x5": Method(checkpoints="last", instances=5),
    # the same with the paper's k = 6 ablation: max-over-draws scores have a heavier right
    # tail than one draw's, and k = 3 flags 5-11% of the clean set on them
    "last-max16x5-k6": Method(checkpoints="last", draws=16, aggregate="max", instances=5,
                              k=6.0),
    # the final checkpoint, the mean over 16 augmentation draws, one instance, the paper's
    # k = 3: averaging the draws keeps the crop signal of 16 draws without the heavier
    # right tail that the max gives clean inputs
    "last-mean16": Method(checkpoints="last", draws=16, aggregate="mean"),
}
# chosen by the harness's rule (best worst-case DACC over the configurations where the attack
# took, docs/RESULTS.md). From 2026-11-25 to 2026-12-04 it was `last-max16x5-k6`, picked on 3
# PE-II 10% runs and kept over 14 more (its worst case: DACC 0.933, FPR 0.071, FNR 0.526, AUC
# 0.958). The automobile-target run continued to 150 epochs (session 22, the first non-truck
# target that took) moved that to DACC 0.912 and FPR 0.096, and over the 18 SimCLR
# configurations that took the rule then picks `last-mean16`: worst DACC 0.9125 against
# 0.9124 (one input of 5,500), worst FPR 0.081 against 0.096, FNR 0.400 against 0.526, but
# worst AUC 0.786 against 0.958 (it ranks the weakest backdoors' poisons worse; it flags fewer
# clean inputs). Switched on 2026-12-04 (session 23; docs/PREREGISTRATION.md entry 5); its
# first runs out of sample, seed 6 at 75 and 150 epochs, left its worst case as it was (DACC
# 0.940 and 0.974 there, against `last-max16x5-k6`'s 0.965 and 0.937)
DEFAULT_METHOD = "last-mean16"
# CLIP scores one fixed view of each image, so its default is a one-draw method: the
# harness's rule (docs/RESULTS.md) on 13 configurations (Carlini-Terzis 1, 2 and 5%, seeds
# 0-4 and target airplane at 5%; CorruptEncoder 15%, seeds 0-4) picks `last-x5`: worst DACC
# 0.812, FPR 0.101, FNR 0.811, AUC 0.859, against the paper's 0.810, 0.080, 1.000, 0.321
# (clean target-class pairs outscore the poisons on CLIP here; seeds 3 and 4 left it as it was)
DEFAULT_CLIP_METHOD = "last-x5"


def default_method_for(run) -> str:
    """The default method for a run (a :class:`ffengine.run.Run`): by its objective."""
    name = run.manifest.get("objective", {}).get("name")
    return DEFAULT_CLIP_METHOD if name == "clip_infonce" else DEFAULT_METHOD


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown scoring method {name!r}; expected one of "
                          f"{sorted(METHODS)}.") from None


__all__ = ["DEFAULT_CLIP_METHOD", "DEFAULT_METHOD", "METHODS", "Method", "default_method_for",
           "get_method"]
