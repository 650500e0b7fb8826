"""Detection-quality harness: a grid of attacks, pre-training runs and traces at CPU scale.

    python bench/detection.py --grid demo               # run (or resume) a named grid
    python bench/detection.py --config pe2-r10          # one configuration by name prefix
    python bench/detection.py --summary --json          # summary of the cached results
    python bench/detection.py --write-md                # regenerate docs/RESULTS.md

Everything is cached under ``--cache`` (default ``bench/.cache/detection``): the poisoned
data, the run (pre-training resumes where it stopped), the instance, and one trace per
method, so re-scoring with a new method never re-trains. Results (one row per
configuration and method) go to ``bench/results/detection.json`` with the command that
made them; ``docs/RESULTS.md`` is generated from that file (``detection_report.py``). Each
configuration's per-sample detection scores go to ``bench/results/scores/<config>.npz``
(``load_scores``), so a new threshold rule can be measured on every configuration without its
pre-training cache.
"""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from machine import cpu_name  # bench/machine.py: bench/ is on sys.path when these run

from ffengine.attacks.clip_attacks import CLIP_ATTACKS
from ffengine.attacks.poisoned_encoder import AttackConfig, load_truth, poison_dataset
from ffengine.attacks.triggers import TriggerConfig
from ffengine.data.demo_data import demo_index
from ffengine.data.index import SampleIndex
from ffengine.demo import bundled_run
from ffengine.detect import flag, refine_by_split
from ffengine.engine.backdoor import (
    backdoor_strength,
    find_instances,
    knn_bank,
    with_optimized_references,
)
from ffengine.engine.instance import load_instance, save_instances
from ffengine.engine.scoring import Engine, aggregate_draws, checkpoint_weights, detection_scores
from ffengine.io_utils import atomic_write_bytes, atomic_write_json
from ffengine.methods import DEFAULT_CLIP_METHOD, DEFAULT_METHOD, Method
from ffengine.methods import METHODS as PRODUCT_METHODS
from ffengine.metrics import detection_metrics
from ffengine.options import BACKENDS, COMPILE_MODES
from ffengine.pretrain.simclr import PretrainConfig, pretrain
from ffengine.report import domain_table
from ffengine.run import MANIFEST, Run
from ffengine.trace import trace

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "detection.json"
RESULTS_MD = ROOT / "docs" / "RESULTS.md"
# each configuration's per-sample detection scores, so that a new threshold or aggregation
# can be measured on every configuration without the (uncommitted) pre-training cache
SCORES_DIR = ROOT / "bench" / "results" / "scores"
# An attack "took" when triggered images land in the target class far more often than the
# same images without the trigger.
TOOK_MIN_ASR, TOOK_MIN_GAP = 0.5, 0.25


@dataclass(frozen=True)
class GridConfig:
    attack: str = "pe2"
    poison_rate: float = 0.10
    trigger_size: int = 8
    trigger_location: str = "bottom-right"
    trigger_shape: str = "square"
    target_class: int = 9
    seed: int = 0
    model: str = "small"
    epochs: int = 75
    # checkpoints are saved every 5 epochs (15 in all) for the paper's checkpoint-count
    # ablation; every other trace uses PAPER_N_CKPTS evenly spaced ones
    ckpt_every: int = 5

    @property
    def is_clip(self) -> bool:
        return self.attack in CLIP_ATTACKS

    @property
    def rate_tag(self) -> str:
        """The poison rate in percent: ``05`` for 5%, ``0p5`` for 0.5%."""
        pct = round(self.poison_rate * 100, 6)
        return f"{round(pct):02d}" if pct == round(pct) else f"{pct:g}".replace(".", "p")

    @property
    def name(self) -> str:
        if self.is_clip:  # CLIP attacks carry their own triggers (ClipAttackConfig)
            return (f"{self.attack}-r{self.rate_tag}-t{self.target_class}"
                    f"-seed{self.seed}-{self.model}-e{self.epochs}")
        loc = "".join(w[0] for w in self.trigger_location.split("-"))
        return (f"{self.attack}-r{self.rate_tag}-s{self.trigger_size}-{loc}"
                f"-{self.trigger_shape}-t{self.target_class}-seed{self.seed}-{self.model}"
                f"-e{self.epochs}")

    def clip_attack_config(self):
        from ffengine.attacks.clip_attacks import ClipAttackConfig

        return ClipAttackConfig(attack=self.attack, modality="clip",
                                target_class=self.target_class, poison_rate=self.poison_rate,
                                seed=self.seed)

    def attack_config(self) -> AttackConfig:
        trig = TriggerConfig(shape=self.trigger_shape, size=self.trigger_size,
                             location=self.trigger_location, seed=self.seed)
        return AttackConfig(attack=self.attack, target_class=self.target_class,
                            poison_rate=self.poison_rate, trigger=trig, seed=self.seed)


def _variant(method: str) -> str:
    """The ablation (ABLATIONS key) a method belongs to, "" for none."""
    return next((v for v, names in ABLATIONS.items() if method in names), "")


def trace_name(method: str, clip: bool = False) -> str:
    """The cached trace whose terms hold this method's: per-(checkpoint, draw, instance)
    terms do not depend on which others are scored beside them, to float32 rounding
    (tests/test_pipeline.py, ``test_terms_do_not_depend_on_the_other_options``), so every
    method is a slice of one trace. CLIP runs have one-draw traces only."""
    m, variant = METHODS[method], _variant(method)
    for name, (ckpts, draws, var) in TRACES.items():
        if (var == variant and ckpts == m.checkpoints and m.draws <= draws
                and (draws == 1 or not clip)):
            return name
    raise ValueError(f"no cached trace holds {method}")


# One trace per (checkpoints, draws, variant) setting, with N_INSTANCES instances in one
# pass. Variants: "" (the default), "optref" (the same x_bs, x_r optimized from noise) and
# "fc2" (only the head's last Linear layer scored).
TRACES = {"all-d1": ("all", 1, ""), "last-d16": ("last", 16, ""),
          "all-d1-optref": ("all", 1, "optref"), "all-d1-fc2": ("all", 1, "fc2"),
          "all-d1-ckpt15": ("all", 1, "ckpt15"), "last-d1": ("last", 1, "")}
N_INSTANCES = 5
# the default method changes only on evidence from at least this many configurations
MIN_CONFIGS_FOR_DEFAULT = 2
# ... and only among detectors: a method that misses this share of the poisons on some
# configuration is not one. Added 2026-12-02, when DACC alone picked `paper-k6` for CLIP (it
# flags 2 of 5,250 inputs: with 5% poisons, flagging nothing scores DACC 0.95); it does not
# change the SimCLR pick.
MAX_FNR_FOR_DEFAULT = 0.9
VARIANT_LAYERS = {"fc2": ("head.fc2",)}
# "all" checkpoints means 5 evenly spaced ones (epochs 15, 30, .., 75 of a 75-epoch run, as in
# the runs made before runs saved every 5 epochs; 30, 60, .., 150 of a 150-epoch run); the
# "ckpt15" variant sums every saved one.
PAPER_N_CKPTS = 5

# The paper's ablations that need their own traces: Table 7's random reference input (x_r
# optimized from uniform noise: Adam, lr 1e-3, 100 steps, maximizing the cosine to x_b) and
# the scored layers (the projection head's last Linear layer alone vs the whole head).
ABLATIONS = {"optref": {"paper-optref": Method(), "paper-optref-5inst": Method(instances=5)},
             "fc2": {"paper-fc2": Method(), "paper-fc2-5inst": Method(instances=5)},
             # Table 6's number of checkpoints: 15 (every 5 epochs) against the 5 of "paper"
             "ckpt15": {"paper-ckpt15": Method(), "paper-ckpt15-5inst": Method(instances=5),
                        "paper-ckpt15-rise-5inst": Method(instances=5, weighting="rise")}}

METHODS = {
    **PRODUCT_METHODS,
    "paper-5inst": Method(instances=5),
    "last-max8": Method(checkpoints="last", draws=8, aggregate="max"),
    "last-max16": Method(checkpoints="last", draws=16, aggregate="max"),
    # the paper's k ablation (Table 6: k = 1, 3, 6)
    "paper-k1": Method(k=1.0),
    # Table 6's other checkpoint count: the final checkpoint alone, one draw
    "paper-ckpt1": Method(checkpoints="last"),
    "paper-k6": Method(k=6.0),
    # the issue's checkpoint weighting by how much cos(f(x_b), f(x_r)) rose since the
    # previous checkpoint (Engine's weighting="rise"): a slice of the paper's trace
    "paper-rise": Method(weighting="rise"),
    "paper-rise-5inst": Method(weighting="rise", instances=5),
    # the instances' minimum instead of their mean (a poison raises every instance's cosine,
    # a clean target-class image the cosine of the instances whose x_r it resembles):
    # picked on 2026-12-02 after the combined-pattern and random-location runs, then
    # measured on the runs traced after that (docs/RESULTS.md)
    "last-max16min5-k6": Method(checkpoints="last", draws=16, aggregate="max", instances=5,
                                k=6.0, combine="min"),
    # the default's scores with MAD k = 9: the best worst-case DACC over k = 3..15 on the 8
    # runs that took with committed per-sample scores (in sample there), pre-registered on
    # 2026-12-03 for the runs traced after it (docs/PREREGISTRATION.md, entry 3)
    "last-max16x5-k9": Method(checkpoints="last", draws=16, aggregate="max", instances=5,
                              k=9.0),
    **{name: m for group in ABLATIONS.values() for name, m in group.items()},
}

_base = GridConfig()
_clip = GridConfig(attack="ct", poison_rate=0.05, model="ffclip-vit-tiny", epochs=30,
                   ckpt_every=6)
GRIDS = {
    # the demo's configuration
    "demo": [_base],
    # poison rate and attack variant first: where the attack takes at this scale
    # (7.5%: between 5%, where PE-II did not take at this scale, and 10%, where it did)
    "rates": [replace(_base, poison_rate=r) for r in (0.01, 0.03, 0.05, 0.075, 0.10)],
    # PE-I did not take at 10% (ASR 0.000): 20% (added 2026-12-03) looks for where it does
    "attacks": [_base, replace(_base, attack="pe1"), replace(_base, attack="pe1", poison_rate=0.2)],
    "trigger": [replace(_base, trigger_size=s) for s in (4, 6, 8, 10)]
    + [replace(_base, trigger_location="random"), replace(_base, trigger_shape="triangle"),
       replace(_base, trigger_shape="logo"), replace(_base, trigger_shape="combined")],
    # the multi-modal attacks on CLIP (open_clip ViT-tiny, 30 epochs, a checkpoint every 6):
    # Carlini-Terzis at 5% and CorruptEncoder at 15%, where each took (README, "Measured"),
    # each with a second seed
    "clip": [_clip, replace(_clip, attack="corruptencoder", poison_rate=0.15),
             replace(_clip, seed=1), replace(_clip, attack="corruptencoder", poison_rate=0.15,
                                             seed=1)],
    # CLIP's poison rate (where Carlini-Terzis stops taking), a third seed of each attack and
    # another target class (airplane): ~15 min each on one core
    "clip-more": [replace(_clip, poison_rate=r) for r in (0.01, 0.02)]
    + [replace(_clip, seed=2), replace(_clip, attack="corruptencoder", poison_rate=0.15, seed=2),
       replace(_clip, target_class=0), replace(_clip, poison_rate=0.005)],
    # seeds 3 and 4 of both CLIP attacks (added 2026-12-03): more CLIP runs for the CLIP
    # default's worst case, each ~25 min on one core of the 2-core VM
    "clip-seeds": [replace(_clip, seed=s) for s in (3, 4)]
    + [replace(_clip, attack="corruptencoder", poison_rate=0.15, seed=s) for s in (3, 4)],
    # seeds 3 and 4 (added 2026-12-02): more runs of the one configuration that takes, to
    # test method candidates out of sample (docs/PREREGISTRATION.md)
    # Seed 5 (added 2026-12-04, session 19, docs/PREREGISTRATION.md entry 4): a run that
    # fits in one session, out of sample for entries 1, 3 and 4. Target class 1, automobile
    # (added 2026-12-04, session 20, same entry): does the attack take on a class other than
    # the truck, and do the entries hold there?
    # Seed 6 (added 2026-12-04, session 23, docs/PREREGISTRATION.md entry 5): the first run
    # out of sample for the default `last-mean16`, picked on the 18 runs before it.
    "seeds": [replace(_base, seed=s) for s in (0, 1, 2, 3, 4)]
    + [replace(_base, target_class=c) for c in (0, 3)] + [replace(_base, seed=5)]
    + [replace(_base, target_class=1), replace(_base, seed=6)],
    # backdoor strength (added 2026-12-03, docs/PREREGISTRATION.md): the two weakest cached
    # runs that took, pre-trained to 150 epochs. The schedule is constant, so their first 75
    # epochs are the 75-epoch runs', which they continue from (extend_shorter_run).
    # Seed 3's square-trigger run joined it on 2026-12-03 (entry 3), a third configuration,
    # and seed 4's after entry 4 (a test of it). Target class 1 (automobile, 2026-12-04,
    # session 22): its 75-epoch run fell just short of taking; does it take at 150?
    # Seed 6 (session 23, entry 5): the new default's first 150-epoch run out of sample.
    "longer": [replace(_base, trigger_shape=t, epochs=150) for t in ("logo", "combined")]
    + [replace(_base, seed=s, epochs=150) for s in (3, 4)]
    + [replace(_base, target_class=1, epochs=150), replace(_base, seed=6, epochs=150)],
    # the random-location trigger with more seeds (added 2026-12-03, docs/PREREGISTRATION.md
    # entry 4): at 75 epochs the only run whose flagged set Otsu's split divided, in sample
    "random-location": [replace(_base, trigger_location="random", seed=s) for s in (1, 2)],
}


def run_config(cfg: GridConfig, cache: Path, methods: list[str], progress: bool,
               backend: str = "auto", compile_backbone: str = "auto") -> list[dict]:
    """Poison, pre-train, measure strength, find the instances, trace with every method.

    ``backend`` and ``compile_backbone`` go to the Engine of each new trace (cached traces are
    not redone). Their defaults are the Engine's; ``backend="torch", compile_backbone="off"``
    runs as the rows traced before 2026-12-04 did, except that the eager backbone now runs
    channels-last (5e-7 relative): both reproduce them to float32 rounding, not bit for bit
    (docs/RESULTS.md)."""
    work = cache / cfg.name
    src = extend_shorter_run(cfg, cache)
    if src is not None:
        print(f"{cfg.name}: continuing from {src.name}'s finished run (same data, settings "
              "and constant schedule, so its epochs are this run's first ones)", file=sys.stderr)
    elif (bundled := seed_from_bundled_run(cfg, cache)) is not None:
        print(f"{cfg.name}: the demo's configuration, traced on the run bundled with the "
              f"package ({bundled}; the trace checks it was trained on this data)",
              file=sys.stderr)
    prep = _prepare_clip if cfg.is_clip else _prepare_simclr
    index, run, strength, t_data, t_run = prep(cfg, work, progress)
    inst_dir = work / "instances"
    inst_paths = sorted(str(d) for d in inst_dir.iterdir() if d.is_dir())
    instances = [load_instance(d) for d in inst_paths]
    took = (strength["asr"] >= TOOK_MIN_ASR
            and strength["asr"] - strength["asr_untriggered"] >= TOOK_MIN_GAP)

    skipped = [m for m in methods if not applies(m, cfg)]
    if skipped:
        print(f"{cfg.name}: skipping {', '.join(skipped)} (CLIP scores one fixed view, and "
              "only the default variant is wired for its runs)", file=sys.stderr)
    methods = [m for m in methods if applies(m, cfg)]
    times = _recorded_times(work, cfg.name, t_data, t_run)
    for name in _trace_order({trace_name(m, cfg.is_clip) for m in methods}):
        ckpts, draws, variant = TRACES[name]
        out = work / "traces" / f"v2-{name}"
        t0 = time.perf_counter()
        if not (out / "summary.json").exists():
            insts, paths = instances, inst_paths
            if variant == "optref":
                insts, paths = _optimized_instances(run, instances, work / "instances-optref")
            engine = Engine(run, checkpoints=_checkpoint_epochs(run, ckpts, variant, cfg),
                            draws=draws, progress=progress,
                            layers=VARIANT_LAYERS.get(variant), backend=backend,
                            compile_backbone=compile_backbone)
            trace(engine, index, insts, out, instance_paths=paths)
            times["trace_s"][name] = round(time.perf_counter() - t0, 1)
    atomic_write_json(work / "times.json", times)

    truth = load_truth(work / "data")
    rows, det_by_method, det_by_aggregation = [], {}, {}
    # the checkpoint spacing the run saved, which a bundled run may do differently
    ckpt_every = run.manifest.get("training", {}).get("ckpt_every", cfg.ckpt_every)
    for name in methods:
        m = METHODS[name]
        tname = trace_name(name, cfg.is_clip)
        tdir = work / "traces" / f"v2-{tname}"
        terms = np.load(tdir / "terms.npy", mmap_mode="r")
        tsummary = json.loads((tdir / "summary.json").read_text())
        cos = np.array(tsummary["cos_per_checkpoint"])
        # methods that differ only in k share one aggregation: compute it once
        key = (tname, replace(m, k=0.0))
        if key not in det_by_aggregation:
            det_by_aggregation[key] = method_scores(terms, m, cos)
        det_by_method[name] = det_by_aggregation[key]
        metrics = score_metrics(det_by_method[name], m, truth, index.labels, cfg.target_class,
                                domains=(index.domains, index.domain_names),
                                n_instances=min(m.instances, terms.shape[3]))
        rows.append({"config": cfg.name, **asdict(cfg), "ckpt_every": ckpt_every,
                     "method": name, **asdict(m),
                     **strength, "took": took, **metrics,
                     "x_b": instances[0].meta.get("x_b_source"),
                     "x_r": instances[0].meta.get("x_r_source"),
                     "data_s": times["data_s"], "pretrain_s": times["pretrain_s"],
                     "trace_s": times["trace_s"].get(tname),
                     # how the trace ran (absent from summaries written before 2026-12-04:
                     # those were all torch and eager)
                     "trace_backend": tsummary.get("backend"),
                     "trace_backbone": tsummary.get("backbone", "eager")})
    save_scores(cfg.name, det_by_method, truth, index)
    return rows


def applies(method: str, cfg: GridConfig) -> bool:
    """Whether ``method`` can be measured on ``cfg``'s run: CLIP scores one fixed view of
    each image, and its runs have neither 15 checkpoints nor a SimCLR head."""
    if not cfg.is_clip:
        return True
    return METHODS[method].draws == 1 and _variant(method) == ""


def _trace_order(names: set[str]) -> list[str]:
    """The traces in TRACES order: the ones the default methods need first, so an
    interrupted run has measured what matters most."""
    return [n for n in TRACES if n in names]


def _data_and_run(work: Path, poison, pretrain_fn, pcfg, progress: bool):
    """The cached poisoned data (``poison(out_dir)`` makes it) and the run (``pretrain_fn``
    resumes it from its last checkpoint), with the seconds each took in this call (None
    where it was cached)."""
    t0, t_data, t_run = time.perf_counter(), None, None
    if not (work / "data" / "truth.json").exists():
        poison(work / "data")
        t_data = time.perf_counter() - t0
    index = SampleIndex(work / "data" / "index")
    t0 = time.perf_counter()
    if _finished(work / "run", pcfg.epochs):
        run = Run(work / "run")
    else:
        run = pretrain_fn(index, work / "run", pcfg, progress=progress,
                          command="python " + " ".join(map(shlex.quote, sys.argv)))
        t_run = time.perf_counter() - t0
        if run.checkpoints and run.checkpoints[-1].train_s is not None:
            # the whole training, an interrupted call's epochs included (this call's wall
            # time counts only what followed a resume)
            t_run = run.checkpoints[-1].train_s
    return index, run, t_data, t_run


def _recorded_times(work: Path, config: str, t_data: float | None,
                    t_run: float | None) -> dict:
    """The wall times a configuration's work took when it was done (``work/times.json``), so
    that rows re-scored from the cache report them rather than this call's near-zero ones.
    Caches from before the file existed are seeded from their rows in the results file. A
    resumed pre-training records its whole training time where its checkpoints carry it
    (runs started since 2026-12-03), else only the part since the resume."""
    path = work / "times.json"
    if path.exists():
        times = json.loads(path.read_text())
    else:
        old = [r for r in load_results()["rows"] if r["config"] == config]
        traces: dict[str, float] = {}
        for r in old:
            if r["method"] in METHODS and r.get("trace_s"):
                name = trace_name(r["method"], r.get("attack") in CLIP_ATTACKS)
                traces[name] = max(traces.get(name, 0.0), r["trace_s"])
        times = {"data_s": max((r.get("data_s") or 0 for r in old), default=None) or None,
                 "pretrain_s": max((r.get("pretrain_s") or 0 for r in old), default=None)
                 or None, "trace_s": traces}
    if t_data is not None:
        times["data_s"] = round(t_data, 1)
    if t_run is not None:
        times["pretrain_s"] = round(t_run, 1)
    return times


def _prepare_simclr(cfg: GridConfig, work: Path, progress: bool):
    """PoisonedEncoder data, a SimCLR run, the backdoor's strength and the instances."""
    acfg = cfg.attack_config()
    pcfg = PretrainConfig(model=cfg.model, epochs=cfg.epochs, ckpt_every=cfg.ckpt_every,
                          seed=cfg.seed)
    index, run, t_data, t_run = _data_and_run(work, lambda out: poison_dataset(
        demo_index("train"), demo_index("aux"), out, acfg), pretrain, pcfg, progress)

    def measure():
        trig = trigger_image(work)
        model = run.load_model(run.checkpoints[-1])
        bank, test = demo_index("train"), demo_index("test")
        knn = knn_bank(model, bank)
        truth = load_truth(work / "data")
        return (backdoor_strength(model, acfg, bank, test, trig, knn=knn),
                find_instances(model, acfg, bank, test, trig, N_INSTANCES, knn=knn,
                               trigger_label=truth.get("pe1_trigger_label")))

    return index, run, _cached_strength_and_instances(work, measure), t_data, t_run


def trigger_image(work: Path) -> np.ndarray | None:
    """The attack's trigger image where it has one (PE-I), as the poisoning saved it."""
    path = work / "data" / "trigger.png"
    if not path.exists():
        return None
    from PIL import Image

    return np.array(Image.open(path).convert("RGB"))


def _cached_strength_and_instances(work: Path, measure) -> dict:
    """The backdoor's strength; ``measure()`` -> (strength, instances) runs only when
    ``work`` does not hold both yet (the instances go to ``work/instances``)."""
    strength_path, inst_dir = work / "strength.json", work / "instances"
    if not strength_path.exists() or not (inst_dir / "done").exists():
        strength, found = measure()
        save_instances(found, inst_dir)
        atomic_write_json(strength_path, strength)
        atomic_write_bytes(inst_dir / "done", b"")
    return json.loads(strength_path.read_text())


def _prepare_clip(cfg: GridConfig, work: Path, progress: bool):
    """Carlini-Terzis or CorruptEncoder image-caption data, a CLIP run (open_clip), the
    backdoor's zero-shot strength and the instances: what ``ffengine clip-demo`` does."""
    from ffengine.attacks.clip_attacks import poison_clip_dataset
    from ffengine.data.demo_data import CIFAR10_CLASSES
    from ffengine.engine.clip_backdoor import clip_backdoor_strength, find_clip_instances
    from ffengine.models.clip import load_clip_model
    from ffengine.pretrain.clip import ClipPretrainConfig, pretrain_clip

    acfg = cfg.clip_attack_config()
    pcfg = ClipPretrainConfig(model=cfg.model, epochs=cfg.epochs, ckpt_every=cfg.ckpt_every,
                              seed=cfg.seed)
    index, run, t_data, t_run = _data_and_run(work, lambda out: poison_clip_dataset(
        demo_index("train"), demo_index("aux"), out, acfg), pretrain_clip, pcfg, progress)

    def measure():
        model = load_clip_model(run, run.checkpoints[-1], "cpu")
        test = demo_index("test")
        return (clip_backdoor_strength(model, acfg, test, CIFAR10_CLASSES),
                find_clip_instances(model, acfg, test, CIFAR10_CLASSES, N_INSTANCES))

    return index, run, _cached_strength_and_instances(work, measure), t_data, t_run


def _checkpoint_epochs(run: Run, ckpts: str, variant: str,
                       cfg: GridConfig) -> str | list[int]:
    """The epochs a trace sums: "all" is the PAPER_N_CKPTS evenly spaced ones, except in
    the "ckpt15" variant, which needs a run saved every 5 epochs, and for CLIP, whose runs
    save 5 checkpoints."""
    epochs = [c.epoch for c in run.checkpoints]
    if ckpts != "all" or cfg.is_clip:
        return ckpts
    if variant == "ckpt15":
        if len(epochs) < 15:
            raise ValueError(f"{run.path} has {len(epochs)} checkpoints; the ckpt15 ablation "
                             "needs a run saved every 5 epochs")
        return epochs
    every = max(cfg.epochs // PAPER_N_CKPTS, 1)
    return [e for e in epochs if e % every == 0]


def _optimized_instances(run: Run, instances: list, out: Path) -> tuple[list, list[str]]:
    """The instances with x_r optimized from noise (cached in ``out``)."""
    if not (out / "done").exists():
        model = run.load_model(run.checkpoints[-1])
        save_instances(with_optimized_references(model, instances), out)
        atomic_write_bytes(out / "done", b"")
    paths = [str(out / f"{i:02d}") for i in range(len(instances))]
    return [load_instance(p) for p in paths], paths


def method_metrics(terms: np.ndarray, m: Method, truth: dict, labels: np.ndarray,
                   target: int, domains: tuple[np.ndarray, list[str]] | None = None,
                   cos: np.ndarray | None = None) -> dict:
    """A method's metrics from a trace's (T, D, n, K) terms (``method_scores`` then
    ``score_metrics``)."""
    return score_metrics(method_scores(terms, m, cos), m, truth, labels, target, domains,
                         n_instances=min(m.instances, terms.shape[3]))


def method_scores(terms: np.ndarray, m: Method, cos: np.ndarray | None = None) -> np.ndarray:
    """A method's (n,) detection scores from a trace's (T, D, n, K) terms: the same
    aggregation ``Engine`` and ``trace`` apply (sum over checkpoints, weighted as the
    method says by the trace's cos (T, K), ``aggregate`` over draws, ``combine`` over
    instances)."""
    k_used = min(m.instances, terms.shape[3])
    if m.weighting != "lr" and cos is None:
        raise ValueError(f"weighting {m.weighting!r} needs the trace's cos per checkpoint")
    weights = None if cos is None else checkpoint_weights(np.asarray(cos)[:, :k_used],
                                                          m.weighting)
    scores = aggregate_draws(np.asarray(terms[:, : m.draws, :, :k_used]), m.aggregate,
                             weights)
    return detection_scores(scores, m.combine)


def score_metrics(det: np.ndarray, m: Method, truth: dict, labels: np.ndarray, target: int,
                  domains: tuple[np.ndarray, list[str]] | None = None, *,
                  n_instances: int) -> dict:
    """The metrics of the method's threshold rule (MAD with its ``k``, refined by Otsu's
    split for ``threshold="mad-split"``, as ``trace`` flags) on detection scores ``det``.
    ``fpr_target`` / ``fpr_other``: the false-positive rate among clean images of the target
    class / of the other classes."""
    flagged = flag(det, m.k)
    if m.threshold == "mad-split":
        flagged, _ = refine_by_split(det, flagged)
    d = detection_metrics(flagged, truth["poisoned_ids"], truth["n"], scores=det)
    return {"dacc": d["DACC"], "fpr": d["FPR"], "fnr": d["FNR"], "auc": d["ROC_AUC"],
            "fnr_at_fpr_1pct": d["FNR_at_FPR_1pct"], "dacc_best": d["DACC_best_threshold"],
            "n": d["n"], "n_poisoned": d["n_poisoned"], "n_flagged": d["n_flagged"],
            "tp": d["tp"], "fp": d["fp"], "n_instances": n_instances,
            **_fpr_by_class(flagged, truth, labels, target),
            **(_domain_verdict(flagged, truth, *domains) if domains is not None else {})}


def save_scores(config: str, det_by_method: dict[str, np.ndarray], truth: dict,
                index: SampleIndex) -> Path:
    """Write ``SCORES_DIR/<config>.npz``: each method's (n,) float32 detection scores (merged
    into what an earlier call wrote), the ground truth (``poisoned``) and each sample's label
    and domain, so a new rule can be measured on every configuration from committed files.
    Methods that differ only in ``k`` share their scores: one copy, the others aliases."""
    path = SCORES_DIR / f"{config}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    scores = load_scores(config)["scores"] if path.exists() else {}
    scores.update({name: np.asarray(det, dtype=np.float32)
                   for name, det in det_by_method.items()})
    poisoned = np.zeros(truth["n"], dtype=bool)
    poisoned[np.asarray(truth["poisoned_ids"], dtype=np.int64)] = True
    arrays = {"poisoned": poisoned, "labels": np.asarray(index.labels, dtype=np.int16),
              "domains": np.asarray(index.domains, dtype=np.int16),
              "domain_names": np.asarray(index.domain_names, dtype=str)}
    aliases = []
    for name in sorted(scores):
        same = next((k for k, v in arrays.items() if k.startswith("score/")
                     and np.array_equal(v, scores[name], equal_nan=True)), None)
        if same is None:
            arrays[f"score/{name}"] = scores[name]
        else:
            aliases.append(f"{name}={same[len('score/'):]}")
    arrays["aliases"] = np.asarray(aliases, dtype=str)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return path


def scored_configs(took_only: bool = True) -> list[str]:
    """The configurations whose per-sample scores are committed (``SCORES_DIR``), sorted;
    with ``took_only`` those where the attack took (by the results file's rows)."""
    names = sorted(c.stem for c in SCORES_DIR.glob("*.npz"))
    if not took_only:
        return names
    took = {r["config"] for r in load_results()["rows"] if r["took"]}
    return [c for c in names if c in took]


def load_scores(config: str) -> dict:
    """``save_scores``'s file: ``scores`` {method: (n,) float32} and the per-sample arrays
    (``poisoned``, ``labels``, ``domains``) and ``domain_names``."""
    with np.load(SCORES_DIR / f"{config}.npz") as f:
        out = {k: f[k] for k in f.files if not k.startswith("score/") and k != "aliases"}
        scores = {k[len("score/"):]: f[k] for k in f.files if k.startswith("score/")}
        for alias in f["aliases"]:
            name, same = str(alias).split("=", 1)
            scores[name] = scores[same]
    out["scores"] = scores
    return out


def _domain_verdict(flagged: np.ndarray, truth: dict, domain_ids: np.ndarray,
                    domain_names: list[str]) -> dict:
    """The domain-level verdict (``ffengine.report.domain_table``, what ``trace`` writes to
    domains.txt): how many of the attacker's domains and of the benign ones it calls
    suspicious."""
    rows = domain_table(flagged, domain_ids, domain_names)
    attacker = set(truth.get("attacker_domains") or ())
    return {"domains_attacker": len(attacker),
            "domains_attacker_flagged": sum(r["suspicious"] for r in rows
                                            if r["domain"] in attacker),
            "domains_benign": sum(r["domain"] not in attacker for r in rows),
            "domains_benign_flagged": sum(r["suspicious"] for r in rows
                                          if r["domain"] not in attacker)}


def _fpr_by_class(flagged: np.ndarray, truth: dict, labels: np.ndarray, target: int) -> dict:
    clean = np.ones(len(labels), bool)
    clean[truth["poisoned_ids"]] = False
    hit = np.zeros(len(labels), bool)
    hit[flagged] = True
    tgt, other = clean & (labels == target), clean & (labels != target) & (labels >= 0)
    return {"fpr_target": float(hit[tgt].mean()) if tgt.any() else None,
            "fpr_other": float(hit[other].mean()) if other.any() else None}


def extend_shorter_run(cfg: GridConfig, cache: Path) -> Path | None:
    """Seed ``cache/cfg.name`` with the longest finished shorter run of the same SimCLR
    configuration, where one is cached and this one's directory does not exist yet: its
    data is copied, its checkpoints are linked (they are never rewritten) and its manifest
    points at the copied index, so pre-training resumes after its last epoch. Under a
    constant learning rate (the harness's) epoch e's permutation, views and step depend only
    on the seed and e, so the result is the run a fresh start would give (a test checks
    this). Returns the source's work directory, or None where nothing was seeded."""
    import os
    import shutil

    work = cache / cfg.name
    if cfg.is_clip or work.exists():
        return None
    src = next((cache / replace(cfg, epochs=e).name for e in range(cfg.epochs - 1, 0, -1)
                if _finished(cache / replace(cfg, epochs=e).name / "run", e)), None)
    if src is None or not (src / "data" / "truth.json").exists():
        return None
    manifest = json.loads((src / "run" / MANIFEST).read_text())
    if manifest["training"].get("schedule") != "constant":
        return None  # a decaying rate depends on the total epochs: not a prefix
    tmp = work.with_name(work.name + ".seeding")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src / "data", tmp / "data")
    (tmp / "run").mkdir()
    for f in (src / "run").iterdir():
        if f.name != MANIFEST and f.is_file():
            try:
                os.link(f, tmp / "run" / f.name)
            except OSError:  # another file system
                shutil.copy2(f, tmp / "run" / f.name)
    manifest["index"]["path"] = str(work / "data" / "index")  # as run_config opens it
    last = manifest["checkpoints"][-1]
    if last.get("train_s") is None and (src / "times.json").exists():
        # runs from before checkpoints recorded their training seconds: the source's total,
        # so that the continued run's seconds count its first epochs too
        last["train_s"] = json.loads((src / "times.json").read_text()).get("pretrain_s")
    manifest["extended_from"] = str(src.resolve() / "run")
    atomic_write_json(tmp / "run" / MANIFEST, manifest)
    tmp.rename(work)
    return src


def seed_from_bundled_run(cfg: GridConfig, cache: Path) -> Path | None:
    """Seed the demo's configuration (grid ``demo``) with the run bundled with the package
    (what ``ffengine demo`` traces), where nothing is cached for it yet: the grid's rows for
    it were measured on that run, and pre-training it again takes hours on a CPU. Only the
    weights and the manifest are bundled (no optimizer state), and it saved a checkpoint
    every 15 epochs, so the 15-checkpoint ablation cannot use it. The trace checks the
    index hash, so a bundled run of other data fails there with a clear error. Returns the
    bundled run's directory, or None where nothing was seeded."""
    import shutil

    work = cache / cfg.name
    src = bundled_run(cfg.attack, cfg.poison_rate)
    if cfg != GRIDS["demo"][0] or work.exists() or src is None:
        return None
    tmp = work.with_name(work.name + ".seeding")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp / "run")
    manifest = json.loads((tmp / "run" / MANIFEST).read_text())
    manifest["index"]["path"] = str(work / "data" / "index")  # as run_config opens it
    manifest["seeded_from"] = str(src)
    atomic_write_json(tmp / "run" / MANIFEST, manifest)
    tmp.rename(work)
    return src


def _finished(run_dir: Path, epochs: int) -> bool:
    try:
        return any(c.epoch == epochs for c in Run(run_dir).checkpoints)
    except Exception:
        return False


def load_results() -> dict:
    if RESULTS.exists():
        return json.loads(RESULTS.read_text())
    return {"rows": []}


def save_rows(rows: list[dict], command: str) -> None:
    """Merge ``rows`` into the results file; an exclusive lock keeps two harness processes
    (a SimCLR and a CLIP configuration side by side) from dropping each other's rows."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _merge_rows(rows, command)


def _merge_rows(rows: list[dict], command: str) -> None:
    res = load_results()
    # rows of methods this process does not know are kept: it may predate them (a harness
    # started before a method was added once dropped that method's rows); the reports leave
    # out rows of methods no longer defined (main)
    for r in rows:
        r["command"] = command
        r["machine"] = f"{platform.machine()} {platform.processor() or ''} {cpu_name()}".strip()
        r["date"] = time.strftime("%Y-%m-%d")
    # a re-measured row replaces the old one where it stood (so a re-run shows in the diff
    # as changed rows, not as rows moved to the end); rows new to the file go at the end
    fresh = {(r["config"], r["method"]): r for r in rows}
    merged = [fresh.pop((r["config"], r["method"]), r) for r in res["rows"]]
    res["rows"] = merged + [r for r in rows if (r["config"], r["method"]) in fresh]
    atomic_write_json(RESULTS, res)


def summary(rows: list[dict]) -> dict:
    """Worst cases over the configurations where the attack took, for the default method and
    the paper's: SimCLR configurations at the top level (they decide ``DEFAULT_METHOD``),
    CLIP ones under ``clip`` (they decide ``DEFAULT_CLIP_METHOD``: one-draw methods only)."""
    image = [r for r in rows if r.get("attack") not in CLIP_ATTACKS]
    clip = [r for r in rows if r.get("attack") in CLIP_ATTACKS]
    return {**_summary(image, DEFAULT_METHOD), "clip": _summary(clip, DEFAULT_CLIP_METHOD)}


def _summary(rows: list[dict], default: str) -> dict:
    def worst(method: str) -> dict:
        sel = [r for r in rows if r["method"] == method and r["took"]]
        if not sel:
            return {"n_configs": 0, "dacc_min": None, "fpr_max": None, "fnr_max": None}
        return {"n_configs": len(sel), "dacc_min": min(r["dacc"] for r in sel),
                "fpr_max": max(r["fpr"] for r in sel), "fnr_max": max(r["fnr"] for r in sel),
                "auc_min": min(r["auc"] for r in sel)}

    took = sorted({r["config"] for r in rows if r["took"]})
    methods = {m: worst(m) for m in sorted({r["method"] for r in rows})}
    # the rule the default is chosen by, fixed before the held-out configurations ran: the
    # best worst-case DACC over every configuration where the attack took, among the
    # methods measured on all of them
    full = {m: w for m, w in methods.items() if w["n_configs"] == len(took) and took
            and w["fnr_max"] < MAX_FNR_FOR_DEFAULT}
    best = (max(full, key=lambda m: full[m]["dacc_min"])
            if full and len(took) >= MIN_CONFIGS_FOR_DEFAULT else None)
    own = worst(default)
    # the default's worst case at the top level; its own configuration count apart, so that
    # it cannot overwrite the number of configurations where the attack took
    return {**own, "default_n_configs": own["n_configs"], "n_configs": len(took),
            "n_configs_tried": len({r["config"] for r in rows}), "best_by_rule": best,
            "default_method": default, "paper": worst("paper"), "methods": methods}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", choices=sorted(GRIDS))
    p.add_argument("--config", help="run the configuration of this name (else those whose "
                   "name starts with it: they are listed first)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, of {sorted(METHODS)}")
    p.add_argument("--cache", default=str(ROOT / "bench" / ".cache" / "detection"))
    p.add_argument("--summary", action="store_true")
    p.add_argument("--write-md", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="ghost-score backend of new traces (default: the Engine's auto)")
    p.add_argument("--compile", default="auto", choices=COMPILE_MODES, dest="compile_backbone",
                   help="compile the backbone of new traces (default: the Engine's auto); "
                   "'--backend torch --compile off' runs as rows traced before 2026-12-04 "
                   "did, but for the backbone's memory format (channels-last since then)")
    a = p.parse_args(argv)
    command = "python bench/detection.py " + " ".join(map(shlex.quote, argv or sys.argv[1:]))
    if a.grid or a.config:
        configs = GRIDS[a.grid] if a.grid else [c for g in GRIDS.values() for c in g]
        if a.config:
            exact = [c for c in configs if c.name == a.config]
            configs = exact or [c for c in configs if c.name.startswith(a.config)]
            print("configurations: " + ", ".join(sorted({c.name for c in configs})),
                  file=sys.stderr, flush=True)
        seen = set()
        for cfg in configs:
            if cfg.name in seen:
                continue
            seen.add(cfg.name)
            rows = run_config(cfg, Path(a.cache), a.methods.split(","), not a.quiet,
                              backend=a.backend, compile_backbone=a.compile_backbone)
            save_rows(rows, command)
            for r in rows:
                print(f"{r['config']:48s} {r['method']:12s} asr {r['asr']:.3f}/"
                      f"{r['asr_untriggered']:.3f} DACC {r['dacc']:.4f} FPR {r['fpr']:.4f} "
                      f"FNR {r['fnr']:.4f} AUC {r['auc']:.4f}", flush=True)
    # rows of methods no longer defined are kept in the file but not reported
    rows = [r for r in load_results()["rows"] if r["method"] in METHODS]
    if a.write_md:
        from detection_report import write_markdown  # it imports this module

        write_markdown(rows)
    if a.summary:
        s = summary(rows)
        print(json.dumps(s, sort_keys=True) if a.json else json.dumps(s, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
