"""The detection harness's report: ``docs/RESULTS.md`` from the rows of
``bench/results/detection.json`` (``python bench/detection.py --write-md``): the side-by-side
table with the paper, the grid's coverage, the pre-registered candidates' tests, every
method's worst case and every row, and why the paper's figures are not reached here."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from detection import (  # bench/ is on sys.path when these run
    GRIDS,
    MAX_FNR_FOR_DEFAULT,
    METHODS,
    MIN_CONFIGS_FOR_DEFAULT,
    N_INSTANCES,
    RESULTS_MD,
    SCORES_DIR,
    TOOK_MIN_ASR,
    TOOK_MIN_GAP,
    _variant,
    load_scores,
    summary,
)
from scipy.stats import spearmanr

from ffengine.attacks.clip_attacks import CLIP_ATTACKS
from ffengine.detect import OTSU_MIN_ETA, flag, refine_by_split
from ffengine.io_utils import atomic_write_bytes
from ffengine.methods import DEFAULT_CLIP_METHOD, DEFAULT_METHOD
from ffengine.metrics import detection_metrics

# The default the pre-registered entries and the longer-pre-training tests were written
# against (docs/PREREGISTRATION.md): their comparisons stay against it after the default moved
# to `last-mean16` on 2026-12-04, since a prediction is tested against what it named.
REGISTERED_AGAINST = "last-max16x5-k6"

# The paper's CIFAR-10 figures for the PoisonedEncoder attacks (FoundationForensics, Table 3:
# all checkpoints, MAD k = 3), as ranges over its PE-I / PE-II rows.
PAPER_ROW = {"dacc": "0.998–1.000", "fpr": "0.000–0.005", "fnr": "0.000–0.040"}

# What limits detection here (items 1-3; item 4 is generated from the rows by strength_lines)
# and what was measured against it (WHY_TRIED; the experiments are in bench/experiments/, each
# re-runnable on the cached runs, with the date of its figures)
WHY_CAUSES = [
    "## Why the paper's figures are not reached here", "",
    "1. **Crops.** A PoisonedEncoder poison raises the cosine only in augmentation draws whose "
    "two views fall on different halves of it, so one draw misses most poisons; the maximum "
    "over 16 draws recovers them (compare `paper`, `last-mean16` and `last-max16`).",
    "2. **Clean target-class images are the false positives.** Once `x_b` sits in the target "
    "cluster, training on clean target-class images raises cos(x_b, x_r) too (FPR target vs "
    "other in the last table). Here the target class is 10% of the clean data (500 images), "
    "so these false positives weigh in FPR ten times more than a class holding 1% would. "
    "They follow how close a class is to x_r's: on the 17 truck-target SimCLR runs that took, "
    "`last-max16x5-k6` flags 0.8–12% of the clean automobiles (the class nearest the truck) "
    "against 0.1–1.6% of the other eight non-target classes together; on the "
    "automobile-target run (2026-12-04; the attack fell just short of taking, ASR 0.454), "
    "4.7% of the clean trucks against 0.3%, and on the same run continued to 150 epochs, "
    "where it took (ASR 0.719; session 22), 66.4% of the clean automobiles, 11.2% of the "
    "clean trucks and 2.4% of the other eight classes: its worst FPR over the grid, 0.096 "
    "(`bench/experiments/class_flag_rates.py`). `last-mean16` flags fewer clean images "
    "there (FPR 0.033) and more elsewhere; the worst-case table above has both.",
    "3. **Early checkpoints add noise.** With one draw, poisons against clean trucks separate "
    "best at the final checkpoint and worse the earlier the checkpoint (seed 2, AUC 0.53 at "
    "epoch 5, 0.64 at 45, 0.72 at 60, 0.81 at 75); summing the last 2–6 checkpoints gives "
    "0.75–0.80. The maximum over 16 draws does not change the order: at epoch 45 it gives "
    "poisons against clean trucks AUC 0.783 (0.947 at 75; seed 2, 5 instances; "
    "`bench/experiments/mid_checkpoint.py`).",
]
WHY_TRIED = [
    "", "Below, \"the default\" is `last-max16x5-k6`, the default when these experiments ran "
    "(until 2026-12-04); they were not repeated for `last-mean16`.",
    "", "What this leaves: on seeds 1 and 2 (final checkpoint, max over draws, 5 instances) "
    "the best threshold anyone could pick with the labels in hand gives DACC 0.937 and 0.973; "
    "`last-max16x5-k6`'s MAD threshold gives 0.935 and 0.964. So the threshold is not what "
    "limits DACC; the ranking of poisons against clean target-class images is (AUC poisons "
    "vs clean trucks 0.757 and 0.948). More draws saturate: from 8 to 16 that best-threshold "
    "DACC moves 0.935 → 0.937 and 0.970 → 0.973. The same holds on the combined-pattern and "
    "random-location runs (2026-12-02, the `best DACC` column): best threshold 0.965 and "
    "0.975, the default's 0.933 and 0.949, with 45% and 43% of the clean trucks flagged. "
    "Other threshold rules on the same scores (`bench/experiments/threshold_rules.py`, which "
    "reads the committed per-sample scores in `bench/results/scores/`) do worse than MAD "
    "with k = 6 on both: the MAD of the lower half only (k = 3: DACC 0.845 and 0.871; k = 6: "
    "0.907 and 0.932) and a two-component Gaussian mixture (0.803 and 0.862); the clean "
    "tail is not Gaussian, and its trucks overlap the poisons.",
    "", "Tried against (2), none of which helps across configurations:",
    "* an optimized random reference (Table 7) and scoring only head.fc2 (rows above);",
    "* a one-sided cosine gradient holding x_r's head output fixed (only x_b moves; "
    "`bench/experiments/one_sided_cosine.py`, the demo's run, max over 8 draws): AUC 0.871 "
    "against 0.976; clean-truck FPR at k = 6 0.047 against 0.256 but FNR 0.870: the poisons "
    "raise the cosine largely by moving x_r, a truck, towards x_b too;",
    "* control pairs scored in the same pass (`bench/experiments/control_pairs.py`, final "
    "checkpoint, 8 draws, 5 instances), each term divided by its cosine gradient's norm and "
    "the control subtracted per draw, before the max: against `x_b` without its trigger, AUC "
    "0.959 against 0.947 on seed 1 but 0.888 against 0.989 on seed 2; against the clean "
    "truck nearest `x_b` (a pair already inside the target cluster), the clean-truck false "
    "positives vanish (FPR target 0.002 at k = 6 on seed 1) and so do the poisons (AUC 0.631 "
    "on seed 1, 0.819 on seed 2): a poison's straddling draw moves the target cluster as a "
    "whole, which is what a clean truck does;",
    "* weighting each draw by how far apart the sample's two views are (`1 - cos` of their "
    "head outputs, the same crops the trace scored; `bench/experiments/view_agreement.py`, "
    "2026-12-02): a clean truck's views agree, a poison's straddling views do not. AUC "
    "against clean trucks 0.757 → 0.866 on seed 1 but 0.947 → 0.932 on seed 2 (max over "
    "draws; DACC at k = 6 0.916 and 0.892 against 0.935 and 0.964). View disagreement alone "
    "(a composite-image detector, not a backdoor score) separates poisons from clean trucks "
    "on seed 1 (AUC 0.924) but not on seed 2 (0.847); summed with the default score "
    "(each robustly standardized) it gives AUC 0.985 and 0.992 (default 0.958 and 0.992) "
    "but DACC at k = 6 0.948 and 0.927 (FNR 0.56 and 0.81). None is kept.",
    "* weighting each checkpoint by how much cos(f(x_b), f(x_r)) rose since the previous one "
    "(`--weighting rise`, methods `paper-rise`, `paper-rise-5inst`, `paper-ckpt15-rise-5inst`; "
    "2026-12-02, sliced from the cached `paper` traces): against Eq. 5 with the same "
    "instances, AUC 0.856 → 0.865 on seed 1 but 0.910 → 0.851 on seed 2 (5 checkpoints; "
    "0.862 → 0.884 and 0.915 → 0.888 with 15), far below the final checkpoint with the max "
    "over draws (0.958, 0.992). On CLIP it removes the early-checkpoint noise that `last-x5` "
    "avoids (CorruptEncoder seed 0: AUC 0.613 → 0.876) but is not better than `last-x5` "
    "anywhere it matters, and with one instance it can zero a whole trace: on Carlini-Terzis "
    "5% seeds 0 and 2 the first instance's cosine never rose after the first checkpoint, so "
    "every score is 0 and nothing is flagged (the engine warns).",
    "* the draws' spread instead of their maximum (`bench/experiments/draw_spread.py`, the "
    "cached final-checkpoint traces, 16 draws, 5 instances): a clean truck should raise the "
    "cosine in every draw, a poison only in its straddling ones. Max − mean over draws: "
    "poisons against clean trucks AUC 0.757 → 0.816 on seed 1 but 0.947 → 0.667 on seed 2; "
    "max − median/2, top-2 mean and standardizing each instance before the mean move the "
    "AUC against clean trucks by 0.035 at most and DACC at k = 6 by 0.006 at most.",
    "* subtracting the median score of a sample's nearest neighbours in embedding space "
    "(`bench/experiments/local_normalization.py`, final checkpoint, backbone or head space, "
    "k = 10–200): a clean truck's neighbours are clean trucks, but 37–66% of a poison's "
    "neighbours are poisons (they share the trigger), so the poisons cancel too: AUC against "
    "clean trucks 0.757 → at most 0.794 on seed 1 and 0.947 → at most 0.940 on seed 2, DACC at "
    "k = 6 never above the default's. Adding the neighbours' median instead (smoothing, "
    "which might lift the poisons through their poison neighbours; 2026-12-04, seeds 0 and "
    "5, the runs whose checkpoints are still cached) does not help either: AUC against clean "
    "trucks 0.884 → at most 0.887 and 0.927 → at most 0.915, DACC at k = 6 0.932–0.941 "
    "against 0.952 and 0.916–0.930 against 0.955.",
    "* the order of the two reductions (`bench/experiments/reduction_order.py`, 2026-12-03, "
    "the four runs that took with cached terms: combined, logo, random location, seed 3): a "
    "poison's straddling draw raises every instance in the same draw, so the maximum over "
    "draws of the instances' mean (or median, minimum, top-2 mean; with or without "
    "standardizing each instance first) might average away what a clean truck raises for "
    "one instance only. It does not: every variant's AUC is within 0.006 of the default's "
    "and its best-threshold DACC within 0.008; the best of them, the maximum of the mean, "
    "moves the AUC against clean trucks by at most 0.005 (0.900, 0.899, 0.947, 0.907 "
    "against 0.897, 0.894, 0.947, 0.903) and the minimum and median lower it by up to 0.036. "
    "How the terms are reduced is saturated; the terms themselves rank some clean trucks "
    "above the poisons.",
    "* the cosine gradient preconditioned by the final checkpoint's Adam state "
    "(`bench/experiments/adam_precondition.py`, 2026-12-03, 8 draws, 5 instances, the seed-4 "
    "and logo runs): under Adam a sample moves the parameters by about g / (sqrt(v̂) + ε), "
    "so the cosine's first-order change is ⟨G / (sqrt(v̂) + ε), g⟩. In the head the Adam "
    "denominators are nearly uniform (1st to 99th percentile within 3.4× on fc1, 1.9× on "
    "fc2, seed 4), and the ranking barely moves, slightly down: AUC 0.978 → 0.976 and "
    "0.983 → 0.982, against clean trucks 0.856 → 0.848 and 0.886 → 0.884, best-threshold "
    "DACC 0.958 → 0.957 and 0.960 → 0.958 (its DACC at k = 6 rises by flagging less, as "
    "the minimum's does). Not kept.",
    "* the earlier checkpoints' evidence fused with the default's scores "
    "(`bench/experiments/score_fusion.py`, 2026-12-03, from the committed scores of the 11 "
    "SimCLR runs that took with them; in sample, so a lead for a pre-registration at most): "
    "before the backdoor forms a clean truck should not raise the cosine, so Eq. 5's sum, or "
    "the earlier checkpoints' part of it (`paper-5inst` − `last-x5`: epochs 15..60, the "
    "learning rate being constant), might demote the clean trucks. It demotes the poisons "
    "more: summed with the default's scores (robust z-scores) the worst AUC against clean "
    "trucks falls 0.757 → 0.705 (mean over the runs 0.916 → 0.892), worst DACC at k = 6 "
    "0.933 → 0.919; their minimum, 0.610 (0.749); the 16 draws' maximum less half their "
    "mean 0.777 (0.878), worst DACC 0.927. No candidate to test. Not kept.",
    "* the instances' minimum instead of their mean (`--combine min`, method "
    "`last-max16min5-k6`; picked on 2026-12-02 after looking at the combined-pattern and "
    "random-location runs, the only ones with cached terms then, and pre-registered in "
    "docs/PREREGISTRATION.md before the next runs were traced; every run it was measured on "
    "is in the table \"Pre-registered candidates\" above). Its prediction, a higher DACC "
    "than the default wherever the attack takes, held on the out-of-sample runs that took "
    "(logo, seeds 3 and 4, logo at 150 epochs, seed 3 at 150 epochs) by the operating point "
    "and not the ranking: each time a lower FPR for a higher FNR or a lower AUC, and at the "
    "FPR the minimum reaches the mean with a larger k misses as many poisons or fewer. It "
    "fails on seed 1, traced again on 2026-12-03 (pre-registration entry 3): DACC 0.918 "
    "against 0.935, FNR 0.616 against 0.526, AUC 0.919 against 0.958. That makes its worst "
    "case lower than the default's, so under the rule it is not the default. PE-I has "
    "one instance, so there the minimum is the mean. Where the attack did not take the "
    "minimum ranks the poisons worse than the mean. Not kept.",
    "* a larger MAD multiplier on the default's scores (`last-max16x5-k9`; k = 9 picked on "
    "2026-12-03 as the best worst-case DACC over the 8 runs that took with committed scores, "
    "then pre-registered, entry 3): it holds on seed 3 at 150 epochs (DACC 0.958 against "
    "0.937, FNR 0 for both) and fails on seed 1 (0.915 against 0.935: FPR 0.000 but FNR "
    "0.940). With seed 1's scores in, k = 6 has the best worst-case DACC of k = 3..9 over "
    "the 10 runs that took with scores (0.933; k = 5: 0.915 on the combined run; k = 7: "
    "0.931 on seed 1). A "
    "fixed k cannot serve both a weak backdoor (seed 1: poisons inside the clean tail) and "
    "a strong one (the 150-epoch runs: poisons far above it). Not kept.",
    "", "**At 150 epochs the threshold becomes the limit.** On the three runs pre-trained "
    "to 150 epochs the default misses almost nothing (FNR 0.000–0.006, AUC 0.996–0.999) and "
    "flags 42–51% of the clean trucks (FPR 0.055–0.069). There, in MAD units of the "
    "default's scores, 90% of the poisons sit between 13 and 34, and the clean scores' "
    "99.5th percentile is at 16–20 (their maximum at 25–26). On seed 3 "
    "at 150 epochs the best threshold with the labels in hand gives DACC 0.993, and MAD "
    "k = 20 gives DACC 0.992, FPR 0.005, FNR 0.044: the issue's target, on one run, with a "
    "k read from that run's labels, so it is not a result. On the 75-epoch runs k = 20 "
    "would miss most of the poisons.",
    "", "**CLIP.** On Carlini-Terzis 5% the clean truck/\"truck\" pairs outscore the poisons "
    "(final checkpoint, 5 instances: AUC of poisons against clean target-class pairs 0.06), "
    "so every sample-level method misses nearly all poisons at a usable FPR (FNR at 1% FPR "
    "1.0). `bench/experiments/clip_variants.py` measured one-sided gradients (only x_b's "
    "embedding moves: clean-truck FPR 0.018 but AUC 0.771 and other-class FPs 8.6%; only "
    "x_r's: AUC 0.371), the untriggered-`x_b` control (AUC 0.789) and the one-sided "
    "difference of the two (AUC 0.229): none separates the poisons. The attack's domains do "
    "stand out at the domain level (last column of the side-by-side table).",
    "", "**PE-I** (10%, seed 0, 2026-12-02): the backdoor did not take by the k-NN measure "
    "(the trigger image stays in its own class: ASR 0.0 against 4.1% untriggered), so its "
    "rows do not count towards the defaults. Its poisons all carry the one trigger image, "
    "and the traceback isolates them anyway (AUC 0.983 for `paper`, 0.998 for the default: "
    "DACC 0.969, FPR 0.034, FNR 0.000). At 20% (2026-12-03) it took completely (ASR 1.000 "
    "against 4.3%), and this is the default's best run: DACC 0.976, FPR 0.021, FNR 0.043, "
    "AUC 0.997, the paper's FNR but twice its FPR bound. The false positives are again "
    "clean trucks (17.8% of them flagged, against 0.3% of the other clean images): x_r is "
    "a truck, and PE-I's x_b, the trigger image, sits in the truck cluster. The paper's Eq. 5 "
    "misses 30% of the poisons here (AUC 0.915); the final checkpoint with one draw is worse "
    "still (AUC 0.630) and the mean over 16 draws 0.786: the maximum over the draws is what "
    "lifts it to 0.997, as on PE-II, where a poison (a composite of the two images) raises "
    "the cosine in the few draws whose two views fall on different halves of it. Which "
    "checkpoints carry the signal differs from PE-II (`bench/experiments/"
    "checkpoint_order.py`, one draw, 5 instances): PE-I's poisons, a thousand composites "
    "of one trigger image, separate best at epochs 5 and 10 (AUC 0.878 and 0.902), before "
    "the backdoor formed (cos(x_b, x_r) 0.13 and 0.22, 0.92 at epoch 15), and worst at the "
    "final one (0.630); on the PE-II runs the final checkpoints separate best (0.86–0.91) "
    "and epoch 15 worst (0.63–0.80). So the paper's ablation with 15 checkpoints "
    "(`paper-ckpt15`, every 5 epochs from epoch 5) does well here: DACC 0.979, FPR 0.011, "
    "FNR 0.074, AUC 0.991, a higher DACC than the default's 0.976 on this run, against "
    "0.879 and 0.889 on PE-II seeds 1 and 2. The optimized reference and scoring only "
    "head.fc2 lose here as on PE-II (AUC 0.809 and 0.846 against `paper`'s 0.915).",
]


# Method candidates pre-registered in docs/PREREGISTRATION.md, each with the configurations
# looked at when it was picked (in sample; every other run it is measured on tests it; a
# longer run continued from an in-sample one is in sample too: its first epochs were seen)
# and its prediction: a DACC higher than the default's, or (``at_least``) at least as high


@dataclass(frozen=True)
class Candidate:
    picked_on: tuple[str, ...]
    at_least: bool = False


PREREGISTERED = {
    # entry 1
    "last-max16min5-k6": Candidate(("pe2-r10-s8-br-combined-t9-seed0-small-e75",
                                    "pe2-r10-s8-br-combined-t9-seed0-small-e150",
                                    "pe2-r10-s8-r-square-t9-seed0-small-e75")),
    # entry 3: k picked on the 8 runs that took with committed scores
    "last-max16x5-k9": Candidate(("pe1-r20-s8-br-square-t9-seed0-small-e75",
                                  "pe2-r10-s8-br-combined-t9-seed0-small-e75",
                                  "pe2-r10-s8-br-combined-t9-seed0-small-e150",
                                  "pe2-r10-s8-br-logo-t9-seed0-small-e75",
                                  "pe2-r10-s8-br-logo-t9-seed0-small-e150",
                                  "pe2-r10-s8-br-square-t9-seed3-small-e75",
                                  "pe2-r10-s8-br-square-t9-seed4-small-e75",
                                  "pe2-r10-s8-r-square-t9-seed0-small-e75"), at_least=True),
}


def strength_lines(rows: list[dict]) -> list[str]:
    """Item 4 of "why not reached": how the figures of the method pre-registered test 2 names
    follow the backdoor's strength (Spearman's rank correlation with ASR) over the SimCLR
    configurations where it took."""
    took = sorted((r for r in rows if r["method"] == REGISTERED_AGAINST and r["took"]
                   and r.get("attack") not in CLIP_ATTACKS), key=lambda r: r["asr"])
    if len(took) < 3:
        return []
    asr = [r["asr"] for r in took]
    # a constant column has no rank correlation
    rho = {k: (f"{spearmanr(asr, v).statistic:.2f}" if len(set(v)) > 1 and len(set(asr)) > 1
               else "n/a")
           for k, v in ((k, [r[k] for r in took])
                        for k in ("auc", "dacc", "fnr_at_fpr_1pct", "fpr"))}
    lo, hi = took[0], took[-1]
    return [f"4. **Backdoor strength.** Over the {len(took)} SimCLR configurations where the "
            f"attack took, `{REGISTERED_AGAINST}` ranks the poisons better the stronger the "
            f"backdoor: Spearman's ρ between the attack's success rate and the AUC "
            f"{rho['auc']}, DACC {rho['dacc']}, FNR at 1% FPR "
            f"{rho['fnr_at_fpr_1pct']}, but FPR {rho['fpr']} (the clean target-class "
            f"images stay). The weakest ({lo['config']}, ASR {lo['asr']:.3f}) has AUC "
            f"{lo['auc']:.3f} and FNR {lo['fnr']:.3f}, the strongest ({hi['config']}, ASR "
            f"{hi['asr']:.3f}) AUC {hi['auc']:.3f} and FNR {hi['fnr']:.3f}. A correlation "
            "noticed after the runs, on few points and two attacks, not a test; it suggests "
            "that stronger backdoors (longer pre-training, larger models than here) would be "
            "traced better, and it says nothing about the clean target-class false "
            "positives. Pre-registered test 2 (section \"Longer pre-training\") tests it "
            "within configurations."]


def _length(config: str) -> tuple[str, int | None]:
    """A configuration name split into its stem and its epoch count (names end in
    ``-e<epochs>``; None where one does not)."""
    stem, _, epochs = config.rpartition("-e")
    return (stem, int(epochs)) if epochs.isdigit() else (config, None)


def _shorter_config(config: str, configs: set[str]) -> str | None:
    """The same configuration pre-trained for fewer epochs, the longest such in ``configs``."""
    stem, epochs = _length(config)
    if epochs is None:
        return None
    shorter = [(e, c) for c, (st, e) in ((c, _length(c)) for c in configs)
               if st == stem and e is not None and e < epochs]
    return max(shorter)[1] if shorter else None


def longer_lines(rows: list[dict]) -> list[str]:
    """Pre-registered tests 2 and 3 (docs/PREREGISTRATION.md): each run pre-trained longer
    against the same configuration's shorter run, for the default they were registered
    against (``REGISTERED_AGAINST``), with the three predictions' verdicts: a stronger
    backdoor (ASR), a better ranking (AUC up and FNR at 1% FPR down), and the clean
    target-class false positives staying (FPR > 0.01, target-class FPR > 0.10)."""
    by = {(r["config"], r["method"]): r for r in rows}
    configs = {c for c, _ in by}
    pairs = [(s, c) for c in sorted(configs, key=lambda c: (_length(c)[0], _length(c)[1] or 0))
             if (s := _shorter_config(c, configs)) is not None
             and (s, REGISTERED_AGAINST) in by and (c, REGISTERED_AGAINST) in by]
    if not pairs:
        return []
    lines = ["## Longer pre-training (pre-registered tests 2 and 3)", "",
             "The same data, seed and settings pre-trained longer (the longer run continues "
             "the shorter one: the learning rate is constant). Predictions written down in "
             "`docs/PREREGISTRATION.md` before the longer runs started: (1) the backdoor is "
             "stronger, (2) the default then (`last-max16x5-k6`) ranks the poisons better "
             "(higher AUC and lower FNR at 1% FPR), (3) the clean target-class images stay "
             "the false positives (FPR above 0.01 and above 0.10 among clean target-class "
             "images). Each cell: shorter → "
             f"longer run, `{REGISTERED_AGAINST}` (and `paper`'s AUC).", "",
             "| config | epochs | ASR | AUC | FNR@1%FPR | DACC | FPR | FNR | FPR target | "
             "`paper` AUC | (1) | (2) | (3) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def arrow(a, b, key, fmt="{:.3f}"):
        va, vb = a.get(key), b.get(key)
        return "n/a" if va is None or vb is None else f"{fmt.format(va)} → {fmt.format(vb)}"

    for short, long in pairs:
        a, b = by[(short, REGISTERED_AGAINST)], by[(long, REGISTERED_AGAINST)]
        pa, pb = by.get((short, "paper")), by.get((long, "paper"))
        v1 = b["asr"] > a["asr"]
        v2 = b["auc"] > a["auc"] and b["fnr_at_fpr_1pct"] < a["fnr_at_fpr_1pct"]
        v3 = b["fpr"] > 0.01 and (b.get("fpr_target") or 0) > 0.10
        epochs = f"{_length(short)[1]} → {_length(long)[1]}"
        paper = "n/a" if pa is None or pb is None else arrow(pa, pb, "auc")
        lines.append(f"| {_length(long)[0]} | {epochs} | {arrow(a, b, 'asr')} | "
                     f"{arrow(a, b, 'auc')} | {arrow(a, b, 'fnr_at_fpr_1pct')} | "
                     f"{arrow(a, b, 'dacc')} | {arrow(a, b, 'fpr')} | {arrow(a, b, 'fnr')} | "
                     f"{arrow(a, b, 'fpr_target')} | {paper} | "
                     + " | ".join("holds" if v else "fails" for v in (v1, v2, v3)) + " |")
    return lines


def matched_fpr(candidate: np.ndarray, baseline: np.ndarray, poisoned: np.ndarray,
                k: float) -> dict:
    """The candidate's FPR and FNR under MAD with ``k``, and the baseline's FNR and MAD
    multiplier at the same FPR (its threshold leaves that fraction of clean inputs above it):
    whether a candidate's higher DACC comes from ranking poisons better or only from a
    stricter operating point, which the baseline reaches with a larger k."""
    flagged = np.zeros(len(candidate), bool)
    flagged[flag(candidate, k)] = True
    fpr = float(flagged[~poisoned].mean())
    thr = float(np.quantile(baseline[~poisoned], 1 - fpr))
    med = float(np.median(baseline))
    mad = float(np.median(np.abs(baseline - med)))
    return {"fpr": fpr, "fnr": float(1 - flagged[poisoned].mean()),
            "fnr_baseline": float((baseline[poisoned] <= thr).mean()),
            "k_baseline": (thr - med) / mad}


def preregistered_lines(rows: list[dict]) -> list[str]:
    """One table row per run each pre-registered candidate was measured on, against the
    default it was registered against (``REGISTERED_AGAINST``): in or out of sample, both
    methods' figures, that default's FNR at the candidate's FPR (from the committed
    per-sample scores), and whether the prediction (a DACC higher than that default's, or at
    least as high, where the attack took) held."""
    by = {(r["config"], r["method"]): r for r in rows}
    lines = ["## Pre-registered candidates", "",
             "Each candidate in `docs/PREREGISTRATION.md` against "
             f"`{REGISTERED_AGAINST}`, the default it was registered against (the default "
             "until 2026-12-04; \"default\" in this section), on every run it was measured "
             "on. In sample: the runs looked at "
             "when it was picked; every other run is a test. Prediction: a higher DACC than the "
             "default (at least as high, for a candidate marked ≥) on every out-of-sample run "
             "where the attack took. Default at the same FPR: "
             "the default's FNR with its threshold moved to the candidate's FPR, and the MAD k "
             "that gives it (`bench/experiments/min_vs_mean_k.py`).", ""]
    for i, (cand, spec) in enumerate(PREREGISTERED.items()):
        lines += ([""] if i else []) + [
            "| candidate | config | sample | took | DACC (cand. / default) | FPR | FNR | AUC | "
            "default at the same FPR: FNR (k) | prediction |",
            "|---|---|---|---|---|---|---|---|---|---|"]
        # a candidate that only moves the default's threshold ranks as the default does
        same_ranking = replace(METHODS[cand], k=METHODS[REGISTERED_AGAINST].k) == METHODS[
            REGISTERED_AGAINST]
        tally = []
        for config in sorted({c for c, m in by if m == cand}):
            a, b = by[(config, cand)], by.get((config, REGISTERED_AGAINST))
            if b is None:
                continue
            in_sample = config in spec.picked_on
            # (moving the default's threshold to a threshold candidate's FPR gives it back)
            matched = "same scores" if same_ranking else "n/a"
            if not same_ranking and (SCORES_DIR / f"{config}.npz").exists():
                saved = load_scores(config)
                if {cand, REGISTERED_AGAINST} <= set(saved["scores"]):
                    mf = matched_fpr(saved["scores"][cand], saved["scores"][REGISTERED_AGAINST],
                                     saved["poisoned"].astype(bool), METHODS[cand].k)
                    matched = f"{mf['fnr_baseline']:.3f} ({mf['k_baseline']:.1f})"
            # a run where the candidate flags exactly what the default flags (PE-I has one
            # instance, so there the instances' minimum is their mean) cannot test it
            same = a["tp"] == b["tp"] and a["fp"] == b["fp"] and a["auc"] == b["auc"]
            held = a["dacc"] >= b["dacc"] if spec.at_least else a["dacc"] > b["dacc"]
            verdict = ("in sample" if in_sample else
                       "no test (attack did not take)" if not a["took"] else
                       f"no test (flags what the default flags: {a['n_instances']} "
                       "instance(s))" if same else "holds" if held else "fails")
            if not in_sample and a["took"] and not same:
                tally.append((held, a["auc"] > b["auc"]))
            lines.append(
                f"| `{cand}`{' ≥' if spec.at_least else ''} | {config} | "
                f"{'in' if in_sample else 'out'} | "
                f"{'yes' if a['took'] else 'no'} | {a['dacc']:.3f} / {b['dacc']:.3f} | "
                f"{a['fpr']:.3f} / {b['fpr']:.3f} | {a['fnr']:.3f} / {b['fnr']:.3f} | "
                f"{a['auc']:.3f} / {b['auc']:.3f} | {matched} | {verdict} |")
        auc = ("its scores are the default's (only k differs)" if same_ranking else
               f"its AUC beat the default's on {sum(u for _, u in tally)} of {len(tally)}")
        lines += ["", f"`{cand}` out of sample where the attack took: the prediction held on "
                  f"{sum(h for h, _ in tally)} of {len(tally)} runs; {auc}."]
    return lines


# Entry 5 (docs/PREREGISTRATION.md): the default moved to `last-mean16`, picked by the rule on
# these 18 SimCLR runs; every later SimCLR run where the attack took tests its predictions
SWITCH = {"method": "last-mean16", "former": REGISTERED_AGAINST,
          "picked_on": (
              "pe1-r20-s8-br-square-t9-seed0-small-e75",
              "pe2-r10-s10-br-square-t9-seed0-small-e75",
              "pe2-r10-s8-br-combined-t9-seed0-small-e150",
              "pe2-r10-s8-br-combined-t9-seed0-small-e75",
              "pe2-r10-s8-br-logo-t9-seed0-small-e150",
              "pe2-r10-s8-br-logo-t9-seed0-small-e75",
              "pe2-r10-s8-br-square-t1-seed0-small-e150",
              "pe2-r10-s8-br-square-t9-seed0-small-e75",
              "pe2-r10-s8-br-square-t9-seed1-small-e75",
              "pe2-r10-s8-br-square-t9-seed2-small-e75",
              "pe2-r10-s8-br-square-t9-seed3-small-e150",
              "pe2-r10-s8-br-square-t9-seed3-small-e75",
              "pe2-r10-s8-br-square-t9-seed4-small-e150",
              "pe2-r10-s8-br-square-t9-seed4-small-e75",
              "pe2-r10-s8-br-square-t9-seed5-small-e75",
              "pe2-r10-s8-r-square-t9-seed0-small-e75",
              "pe2-r10-s8-r-square-t9-seed1-small-e75",
              "pe2-r10-s8-r-square-t9-seed2-small-e75")}


def switch_predictions(new: dict, former: dict, worst: float) -> list[tuple[str, bool]]:
    """Entry 5's predictions for one run where the attack took, as registered by its epoch
    count: at 75 epochs the new default keeps its worst case, misses more poisons than the
    former default and has a lower DACC, and flags over 1% of the clean inputs and over 10%
    of the clean target-class images; at 150 epochs it has a higher DACC than the former
    default and keeps its worst case; at other lengths only the worst case was registered."""
    keeps = ("DACC ≥ in-sample worst", new["dacc"] >= worst)
    epochs = _length(new["config"])[1]
    if epochs == 150:
        return [("DACC above the former's", new["dacc"] > former["dacc"]), keeps]
    if epochs != 75:
        return [keeps]
    return [keeps, ("FNR above the former's", new["fnr"] > former["fnr"]),
            ("DACC below the former's", new["dacc"] < former["dacc"]),
            ("FPR > 0.01, target > 0.10",
             new["fpr"] > 0.01 and (new.get("fpr_target") or 0) > 0.10)]


def switch_lines(rows: list[dict]) -> list[str]:
    """Entry 5: the default `last-mean16` against the former default on every SimCLR run
    where the attack took that it was not picked on, with its predictions' verdicts."""
    by = {(r["config"], r["method"]): r for r in rows}
    new, former = SWITCH["method"], SWITCH["former"]
    picked = [by[(c, new)] for c in SWITCH["picked_on"] if (c, new) in by]
    if not picked:
        return []
    worst = min(r["dacc"] for r in picked)
    lines = [f"`{new}` (entry 5, the default since 2026-12-04) out of sample: every SimCLR run "
             f"where the attack took, other than the {len(picked)} it was picked on (worst "
             f"DACC there {worst:.4f}), against `{former}`. Predictions as registered: at 75 "
             "epochs, a DACC at least that worst, a higher FNR and a lower DACC than the "
             "former default's, FPR above 0.01 and above 0.10 among the clean target-class "
             "images; at 150 epochs, a higher DACC than the former default's and at least "
             "that worst; at other lengths, only at least that worst.", "",
             "| config | DACC (new / former) | FPR | FNR | AUC | predictions |",
             "|---|---|---|---|---|---|"]
    tally = []
    for r in sorted((r for r in rows if r["method"] == new and r["took"]
                     and r.get("attack") not in CLIP_ATTACKS
                     and r["config"] not in SWITCH["picked_on"]), key=lambda r: r["config"]):
        b = by.get((r["config"], former))
        if b is None:
            continue
        verdicts = switch_predictions(r, b, worst)
        tally += [held for _, held in verdicts]
        lines.append(f"| {r['config']} | {r['dacc']:.3f} / {b['dacc']:.3f} | "
                     f"{r['fpr']:.3f} / {b['fpr']:.3f} | {r['fnr']:.3f} / {b['fnr']:.3f} | "
                     f"{r['auc']:.3f} / {b['auc']:.3f} | "
                     + "; ".join(f"{name}: {'holds' if held else 'fails'}"
                                 for name, held in verdicts) + " |")
    lines += ["", f"`{new}` out of sample: " + (
        f"{sum(tally)} of {len(tally)} predictions held." if tally else
        "no run yet, so its predictions are untested.")]
    return lines


# Threshold rules pre-registered in docs/PREREGISTRATION.md: a rule on one method's committed
# per-sample scores (the ranking is that method's; only the flagged set changes). Entry 4 was
# picked on 2026-12-03 looking at every run whose scores were committed then (ab566ac).
SPLIT_RULE = {"name": "mad-k6-otsu-gated", "method": "last-max16x5-k6", "k": 6.0,
              "max_fpr_where_split": 0.01,
              "picked_on": (
                  "pe1-r20-s8-br-square-t9-seed0-small-e75",
                  "pe2-r01-s8-br-square-t9-seed0-small-e75",
                  "pe2-r03-s8-br-square-t9-seed0-small-e75",
                  "pe2-r10-s4-br-square-t9-seed0-small-e75",
                  "pe2-r10-s6-br-square-t9-seed0-small-e75",
                  "pe2-r10-s8-br-combined-t9-seed0-small-e150",
                  "pe2-r10-s8-br-combined-t9-seed0-small-e75",
                  "pe2-r10-s8-br-logo-t9-seed0-small-e150",
                  "pe2-r10-s8-br-logo-t9-seed0-small-e75",
                  "pe2-r10-s8-br-square-t3-seed0-small-e75",
                  "pe2-r10-s8-br-square-t9-seed1-small-e75",
                  "pe2-r10-s8-br-square-t9-seed3-small-e150",
                  "pe2-r10-s8-br-square-t9-seed3-small-e75",
                  "pe2-r10-s8-br-square-t9-seed4-small-e75",
                  "pe2-r10-s8-br-triangle-t9-seed0-small-e75",
                  "pe2-r10-s8-r-square-t9-seed0-small-e75")}


def split_rule_lines(rows: list[dict]) -> list[str]:
    """Entry 4 (``ffengine.detect.refine_by_split`` on the default's scores after MAD k = 6)
    on every SimCLR run with committed scores: Otsu's η of the flagged set, whether the gate
    let it split, the rule's figures against k = 6 alone and what the split would have given
    ungated. Its predictions, on runs out of sample where the attack took: a DACC at least
    k = 6's, and where it splits an FPR of at most 0.01."""
    rule, took = SPLIT_RULE, {r["config"]: r["took"] for r in rows}
    lines = [f"`{rule['name']}` (entry 4, a threshold rule): `{rule['method']}`'s scores, MAD "
             f"k = {rule['k']:g}, then Otsu's split of the flagged scores, keeping the upper "
             f"group where η ≥ {OTSU_MIN_ETA} (`ffengine.detect.refine_by_split`). "
             "Predictions out of sample where the attack took: a DACC at least k = 6's; "
             f"where it splits, an FPR of at most {rule['max_fpr_where_split']}. Ungated: "
             "the split applied whatever η is.", "",
             "| config | sample | took | η | split | DACC (rule / k = 6) | FPR | FNR | "
             "ungated: DACC / FPR / FNR | prediction |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    tally = []
    for config in sorted(c.stem for c in SCORES_DIR.glob("*.npz")):
        if config not in took:
            continue
        saved = load_scores(config)
        if rule["method"] not in saved["scores"]:
            continue
        x = saved["scores"][rule["method"]].astype(np.float64)
        truth = np.flatnonzero(saved["poisoned"])
        mad_ids = flag(x, rule["k"])
        ids, split = refine_by_split(x, mad_ids)
        ungated, _ = refine_by_split(x, mad_ids, 0.0)
        (d, fp, fn), (d0, fp0, fn0), (du, fpu, fnu) = (
            (m["DACC"], m["FPR"], m["FNR"]) for m in (
                detection_metrics(sel, truth, len(x)) for sel in (ids, mad_ids, ungated)))
        in_sample = config in rule["picked_on"]
        held = d >= d0 and (not split.applied or fp <= rule["max_fpr_where_split"])
        verdict = ("in sample" if in_sample else
                   "no test (attack did not take)" if not took[config] else
                   "no test (no clear split: flags what k = 6 flags)" if not split.applied
                   else "holds" if held else "fails")
        if not in_sample and took[config] and split.applied:
            tally.append(held)
        lines.append(f"| {config} | {'in' if in_sample else 'out'} | "
                     f"{'yes' if took[config] else 'no'} | {split.eta:.3f} | "
                     f"{'yes' if split.applied else 'no'} | {d:.3f} / {d0:.3f} | "
                     f"{fp:.3f} / {fp0:.3f} | {fn:.3f} / {fn0:.3f} | "
                     f"{du:.3f} / {fpu:.3f} / {fnu:.3f} | {verdict} |")
    lines += ["", f"`{rule['name']}` out of sample where the attack took and the gate split: "
              + (f"the predictions held on {sum(tally)} of {len(tally)} runs." if tally else
                 "none yet, so its predictions are untested.")]
    return lines


def clip_threshold_lines(rows: list[dict]) -> list[str]:
    """How far the CLIP default's best threshold (labels in hand) gets above flagging
    nothing (DACC 1 − poison share), over the CLIP runs that took and record it."""
    runs = [r for r in rows if r["method"] == DEFAULT_CLIP_METHOD and r["took"]
            and r.get("attack") in CLIP_ATTACKS and r.get("dacc_best") is not None]
    if not runs:
        return []
    margin = {r["config"]: r["dacc_best"] - (1 - r["n_poisoned"] / r["n"]) for r in runs}
    none = sorted(c for c, m in margin.items() if m < 1e-9)
    return ["", f"On the {len(runs)} CLIP runs that took and record it, the best threshold "
            f"on `{DEFAULT_CLIP_METHOD}`'s scores, chosen with the labels in hand, beats "
            f"flagging nothing (DACC 1 − the poison share) by at most "
            f"{max(margin.values()):.4f}, and on {len(none)} of them not at all: there the "
            "poisons never outnumber the clean inputs above any cut. At the sample level "
            "these CLIP scores do not detect the poisons; what stands out is the attacker's "
            "domains (last column of the side-by-side table)."]


def write_markdown(rows: list[dict]) -> None:
    s = summary(rows)
    took = sorted({r["config"] for r in rows if r["took"]})
    by = {(r["config"], r["method"]): r for r in rows}
    lines = ["# Detection quality at CPU scale", "",
             "Generated by `python bench/detection.py --write-md` from "
             "`bench/results/detection.json`; every row names the command that made it. "
             f"An attack took when ASR ≥ {TOOK_MIN_ASR} and ASR − untriggered ≥ "
             f"{TOOK_MIN_GAP} (k-NN, k = 20, on backbone features of the clean training "
             "images). Each configuration is traced once per (checkpoints, draws) setting with "
             f"{N_INSTANCES} backdoor instances in one pass; every method is a slice of those "
             "terms: the same numbers `ffengine trace` gives with the method's options (`--method` "
             "names only the product's methods, `paper`, `last-max16x5`, `last-x5` and the "
             "default; the others are harness names for `--checkpoints`, `--draws`, "
             "`--aggregate`, `--combine`, `--k` and `--weighting`, and the `optref`, `fc2` and "
             "`ckpt15` "
             "variants need their own instances (`instance --reference optimized`), layers "
             "(`--layers`) or run). Traces made before 2026-12-04 ran the `torch` ghost-score "
             "backend and an eager backbone; later ones take the Engine's defaults (the `cpu` "
             "op, and until the evening of 2026-12-04 the compiled backbone for passes of "
             "50,000 backbone images or more, eager on a CPU since), "
             "which differ from them at rounding level; `--backend torch --compile off` runs "
             "as the older ones did but for the eager backbone's memory format (channels-last "
             "since 2026-12-04, 5e-7 relative) and, since the evening of 2026-12-04, its batch "
             "norms folded into the convolutions and its 64-view forwards on a CPU (2e-7), so "
             "it too reproduces them to float32 rounding, not bit for bit. Each row of the "
             "JSON records how it was traced (`trace_backend`, `trace_backbone`).", "",
             f"ffengine's default method: `{DEFAULT_METHOD}`. Over the {s['n_configs']} "
             f"configuration(s) where the attack took (of {s['n_configs_tried']} tried) its "
             f"worst DACC {_f(s['dacc_min'])}, FPR {_f(s['fpr_max'])}, FNR "
             f"{_f(s['fnr_max'])}; the paper's method: DACC {_f(s['paper']['dacc_min'])}, "
             f"FPR {_f(s['paper']['fpr_max'])}, FNR {_f(s['paper']['fnr_max'])}. "
             f"CLIP (default `{DEFAULT_CLIP_METHOD}`: CLIP scores one fixed view, so its "
             f"methods have one draw): {s['clip']['n_configs']} configuration(s) took (of "
             f"{s['clip']['n_configs_tried']} tried), worst DACC {_f(s['clip']['dacc_min'])}, "
             f"FPR {_f(s['clip']['fpr_max'])}, FNR {_f(s['clip']['fnr_max'])}.", "",
             "How the default is chosen (the rule was fixed on 2026-11-25 after looking at the "
             "PE-II 10% configuration only, before any other configuration was traced): the "
             "method with the best worst-case DACC over every configuration where the attack "
             f"took, among those measured on all of them, once at least "
             f"{MIN_CONFIGS_FOR_DEFAULT} configurations took (one configuration is not a "
             "grid). Amended on 2026-12-02: only among detectors, methods whose worst FNR is "
             f"below {MAX_FNR_FOR_DEFAULT} (DACC alone picked `paper-k6` for CLIP, which "
             "flags 2 of 5,250 inputs: with 5% poisons, flagging nothing scores DACC 0.95); "
             "the amendment does not change the SimCLR pick. "
             + (f"By that rule the cached results pick `{s['best_by_rule']}`."
                          if s["best_by_rule"] else
                          f"The cached results hold {s['n_configs']} such configuration(s), so "
                          "the default stays the paper's method.")
             + (f" For CLIP the rule picks `{s['clip']['best_by_rule']}`."
                if s["clip"]["best_by_rule"] else "")
             + (f" **The product's default is still `{DEFAULT_METHOD}`**: switching to the "
                "rule's pick (ffengine/methods.py, the demo, the docs) is not made yet."
                if s["best_by_rule"] not in (None, DEFAULT_METHOD) else "")
             + f" The pick moved from `{REGISTERED_AGAINST}` to `{SWITCH['method']}` with the "
             "run of "
             "2026-12-04 (target class 1 at 150 epochs), by one input of 5,500 in worst DACC "
             "and ahead in worst FPR and FNR, behind in worst AUC (the table of worst cases "
             "below); the product switched the same day (docs/PREREGISTRATION.md, sessions "
             "22 and 23).", "",
             "Why the paper's figures are not reached here, and what was tried: see the last "
             "section. At the domain level (the verdict `ffengine trace` writes to "
             "domains.txt: a one-sided Fisher exact test of each domain's flag count against "
             "the other domains', Bonferroni-corrected, a rate at least twice theirs, stepped "
             "down: the domains called leave the baseline and the rest are tested again) the "
             "last column of the side-by-side table counts the attacker's domains found and "
             "the benign domains called suspicious. (Rows made before 2026-12-03 07:00 UTC used "
             "a one-pass binomial test; `bench/experiments/domain_verdict_recheck.py` "
             "recomputes with the present test every row whose per-sample scores are "
             "committed: on 2026-12-03 all 140 of them, 10 configurations, agreed.) In the "
             "harness's data "
             "every poison sits on one of two attacker domains that hold nothing else, so the "
             "verdict measures whether the flagged set concentrates there, and gating the "
             "sample flags by it would reach FPR 0 by construction; it is not counted as "
             "sample-level detection. Hosting the poisons on benign domains instead, among "
             "their clean images (`bench/experiments/domain_spread.py`: domains are metadata, "
             "so the committed scores of the four runs that took with the default's scores "
             "can be rehosted without re-training): on 1 or 2 benign domains the verdict finds "
             "every host in every draw; on 3 of the 8 it finds 2.7–3.0 of them on average "
             "(the one-pass binomial test: 1.15), on 4 or all 8 none (a host's rate is then "
             "under twice the others'); it never called a domain without poisons "
             "suspicious.", "",
             "## Side by side with the paper", "",
             "| config | paper, Table 3 (DACC / FPR / FNR) | paper's method here | "
             f"ffengine default (`{DEFAULT_METHOD}`) here | domains: attacker found, benign "
             "flagged (paper's / default) |", "|---|---|---|---|---|"]
    clip_configs = {r["config"] for r in rows if r.get("attack") in CLIP_ATTACKS}
    for c in took:
        cells = []
        default = DEFAULT_CLIP_METHOD if c in clip_configs else DEFAULT_METHOD
        for m in ("paper", default):
            r = by.get((c, m))
            cells.append("n/a" if r is None else
                         f"{r['dacc']:.3f} / {r['fpr']:.3f} / {r['fnr']:.3f} (AUC {r['auc']:.3f})")
        if default != DEFAULT_METHOD:
            cells[1] += f" (`{default}`: CLIP)"
        paper = ("— (the paper's CLIP figures are not on this data)" if c in clip_configs
                 else f"{PAPER_ROW['dacc']} / {PAPER_ROW['fpr']} / {PAPER_ROW['fnr']}")
        doms = " / ".join(_domains_cell(by.get((c, m))) for m in ("paper", default))
        lines.append(f"| {c} | {paper} | {cells[0]} | {cells[1]} | {doms} |")
    lines += ["", *coverage_lines(rows)]
    lines += ["", *preregistered_lines(rows), "", *split_rule_lines(rows)]
    if switch := switch_lines(rows):
        lines += ["", *switch]
    if longer := longer_lines(rows):
        lines += ["", *longer]
    lines += ["", "## Methods", "", "| method | what it does |", "|---|---|"]
    notes = {"optref": "; x_r optimized from noise (Table 7)",
             "fc2": "; only head.fc2 scored",
             "ckpt15": "; 15 checkpoints (every 5 epochs) instead of 5"}
    for name, m in METHODS.items():
        extra = notes.get(_variant(name), "")
        lines.append(f"| `{name}` | {m.describe()}{extra} |")
    lines += ["", "## Worst case per method over the configurations where the attack took", "",
              "| method | configs | worst DACC | worst FPR | worst FNR | worst AUC |",
              "|---|---|---|---|---|---|"]
    for name in METHODS:
        w = s["methods"].get(name)
        if w and w["n_configs"]:
            lines.append(f"| `{name}` | {w['n_configs']} | {w['dacc_min']:.4f} | "
                         f"{w['fpr_max']:.4f} | {w['fnr_max']:.4f} | {w['auc_min']:.4f} |")
    lines += ["", "## Every row", "",
              "FPR target / other: the false-positive rate among clean images of the target "
              "class / of the other classes. Best DACC: the DACC of the best threshold on the "
              "method's scores (an oracle that reads the truth: where it is near DACC, no "
              "threshold rule would help, the ranking itself is what falls short; n/a for "
              "rows measured before this column was added on 2026-12-02).", "",
              "| config | method | ASR | ASR untrig. | took | DACC | best DACC | FPR | FNR | "
              "AUC | FNR@1%FPR | FPR target | FPR other | flagged | domains | pretrain s | "
              "trace s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(rows, key=lambda r: (r["config"], order.get(r["method"], 99))):
        lines.append(
            f"| {r['config']} | {r['method']} | {r['asr']:.3f} | {r['asr_untriggered']:.3f} | "
            f"{'yes' if r['took'] else 'no'} | {r['dacc']:.4f} | {_f(r.get('dacc_best'))} | "
            f"{r['fpr']:.4f} | "
            f"{r['fnr']:.4f} | {r['auc']:.4f} | {r['fnr_at_fpr_1pct']:.4f} | "
            f"{_f(r.get('fpr_target'))} | {_f(r.get('fpr_other'))} | {r['n_flagged']} | "
            f"{_domains_cell(r)} | {_s(r['pretrain_s'])} | {_s(r['trace_s'])} |")
    lines += ["", "Times (seconds) are those of the pre-training and of the shared trace the "
              "method was sliced from, when they ran (`times.json` in the configuration's "
              "cache), not those of a later command that re-scored the cached terms; rows "
              "re-scored before 2026-12-02 show 0, and a pre-training started before "
              "2026-12-03 and resumed after an interruption counts only the part after the "
              "resume (checkpoints now record the training seconds behind them); the two 150-epoch "
              "runs count epochs 76–150 only (their 75-epoch sources predate the recorded "
              "seconds). Domains: "
              "attacker domains called suspicious / all attacker domains, then benign domains "
              "called suspicious / all benign ones (— where the row predates the verdict).",
              "", *WHY_CAUSES, *strength_lines(rows), *WHY_TRIED,
              *clip_threshold_lines(rows), "", "Commands:", ""]
    for cmd in sorted({r["command"] for r in rows}):
        lines.append(f"* `{cmd}`")
    RESULTS_MD.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(RESULTS_MD, ("\n".join(lines) + "\n").encode())


def coverage_lines(rows: list[dict]) -> list[str]:
    """The grid's configurations, each with whether the attack took or that it is not run yet
    (what is measured and what is still missing, in one place)."""
    measured = {r["config"]: r for r in rows}  # a configuration's rows share ASR and took
    lines = ["## Grid coverage", "",
             "Every configuration of the grids (`--grid NAME`), run or not: what is measured and "
             "what is still to run.", "",
             "| grid | config | status | ASR / untriggered |", "|---|---|---|---|"]
    in_grids = {c.name for g in GRIDS.values() for c in g}
    places = [(grid, cfg.name) for grid, configs in GRIDS.items() for cfg in configs]
    places += [("(no grid)", name) for name in sorted(set(measured) - in_grids)]
    for grid, name in places:
        r = measured.get(name)
        status = ("not run yet" if r is None else
                  "attack took" if r["took"] else "attack did not take")
        asr = "" if r is None else f"{r['asr']:.3f} / {r['asr_untriggered']:.3f}"
        lines.append(f"| {grid} | {name} | {status} | {asr} |")
    return lines


def _s(x) -> str:
    return "n/a" if x is None else f"{x:g}"


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _domains_cell(r: dict | None) -> str:
    if r is None or "domains_attacker" not in r:
        return "—"
    return (f"{r['domains_attacker_flagged']}/{r['domains_attacker']}, "
            f"{r['domains_benign_flagged']}/{r['domains_benign']}")
