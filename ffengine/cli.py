"""The ``ffengine`` command: a thin layer over the Python API.

Errors derived from FFEngineError print one line and exit 1 (``--debug`` shows the
traceback); usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from . import __version__
from .attacks.triggers import SHAPES
from .errors import ConfigError, FFEngineError
from .methods import (
    DEFAULT_CLIP_METHOD,
    DEFAULT_METHOD,
    METHODS,
    default_method_for,
    get_method,
)
from .options import (
    AGGREGATES,
    BACKENDS,
    CHECKPOINT_WEIGHTS,
    COMBINES,
    COMPILE_MODES,
    PRECISIONS,
    THRESHOLD_RULES,
)


def _add_attack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attack", default="pe2", choices=["pe1", "pe2", "ct", "corruptencoder"],
                   help="PoisonedEncoder pe1 (a whole trigger image) or pe2 (a patch); "
                   "Carlini-Terzis ct (CLIP); CorruptEncoder (see --modality)")
    p.add_argument("--modality", default="clip", choices=["clip", "simclr"],
                   help="corruptencoder: poison image-caption (clip) or image-only (simclr) "
                   "pre-training")
    p.add_argument("--target-class", type=int, default=9, help="target class (9: truck)")
    p.add_argument("--poison-rate", type=float, default=0.1,
                   help="poisons added, as a fraction of the clean set's size")
    p.add_argument("--trigger-size", type=int, default=8)
    p.add_argument("--trigger-shape", default="square", choices=list(SHAPES))
    p.add_argument("--trigger-colour", default="random",
                   help="'random' (a fixed random-colour pattern), 'r,g,b' or '#rrggbb'")
    p.add_argument("--trigger-location", default="bottom-right",
                   choices=["bottom-right", "bottom-left", "top-right", "top-left", "random"])
    p.add_argument("--seed", type=int, default=0)


def _trigger_config(a: argparse.Namespace):
    from .attacks.triggers import TriggerConfig, parse_colour

    return TriggerConfig(shape=a.trigger_shape, size=a.trigger_size,
                         colour=parse_colour(a.trigger_colour), location=a.trigger_location,
                         seed=a.seed)


def _attack_config(a: argparse.Namespace):
    from .attacks.poisoned_encoder import AttackConfig

    return AttackConfig(attack=a.attack, target_class=a.target_class,
                        poison_rate=a.poison_rate, trigger=_trigger_config(a), seed=a.seed)


def _emit(obj: dict, as_json: bool, human: str) -> None:
    print(human)
    if as_json:
        print(json.dumps(obj, sort_keys=True))


def cmd_index(a: argparse.Namespace) -> int:
    from .data.index import build_index

    ix = build_index(a.shards, a.output, verify=not a.no_verify, progress=not a.quiet)
    info = {"index": str(ix.path), "n": len(ix), "hash": ix.hash,
            "n_corrupt": int(ix.metadata["n_corrupt"]), "domains": ix.domain_names}
    _emit(info, a.json, f"indexed {len(ix)} samples ({info['n_corrupt']} corrupt) into "
          f"{ix.path}")
    return 0


def _open_split(path: str | None, split: str):
    from .data.demo_data import demo_index
    from .data.index import SampleIndex

    return SampleIndex(path) if path else demo_index(split)


def cmd_poison(a: argparse.Namespace) -> int:
    from .attacks.poisoned_encoder import poison_dataset

    if a.attack in ("ct", "corruptencoder"):
        from .attacks.clip_attacks import ClipAttackConfig, poison_clip_dataset

        cfg = ClipAttackConfig(attack=a.attack, modality=a.modality, target_class=a.target_class,
                               poison_rate=a.poison_rate, trigger=_trigger_config(a),
                               seed=a.seed)
        truth = poison_clip_dataset(_open_split(a.clean, "train"), _open_split(a.aux, "aux"),
                                    a.output, cfg)
    else:
        truth = poison_dataset(_open_split(a.clean, "train"), _open_split(a.aux, "aux"),
                               a.output, _attack_config(a))
    info = {"output": a.output, "index": str(Path(a.output) / "index"), "n": truth["n"],
            "n_poisoned": len(truth["poisoned_ids"]), "index_hash": truth["index_hash"]}
    _emit(info, a.json, f"wrote {truth['n']} samples ({info['n_poisoned']} poisoned) to "
          f"{a.output}; index at {info['index']}, ground truth at {a.output}/truth.json")
    return 0


def cmd_pretrain(a: argparse.Namespace) -> int:
    from .data.index import SampleIndex

    command = "ffengine " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    # options left unset take the modality's own defaults (its config dataclass's), so
    # `--modality clip` trains as documented (30 epochs, cosine, a checkpoint every 5)
    given = {k: v for k, v in {"model": a.model, "epochs": a.epochs, "lr": a.lr,
                               "batch_size": a.batch_size, "weight_decay": a.weight_decay,
                               "schedule": a.schedule, "ckpt_every": a.ckpt_every}.items()
             if v is not None}
    if a.modality == "clip":
        from .pretrain.clip import ClipPretrainConfig, pretrain_clip

        if a.temperature is not None:
            raise ConfigError("--temperature is SimCLR's; CLIP learns its temperature (the "
                              "logit scale). Leave it out with --modality clip.")
        ccfg = ClipPretrainConfig(**given, seed=a.seed, bf16=a.bf16)
        run = pretrain_clip(SampleIndex(a.index), a.output, ccfg, device=a.device,
                            command=command, progress=not a.quiet)
    else:
        from .pretrain.simclr import PretrainConfig, pretrain

        if a.temperature is not None:
            given["temperature"] = a.temperature
        cfg = PretrainConfig(**given, seed=a.seed, bf16=a.bf16)
        run = pretrain(SampleIndex(a.index), a.output, cfg, device=a.device, command=command,
                       progress=not a.quiet)
    info = {"run": str(run.path), "checkpoints": [c.epoch for c in run.checkpoints]}
    _emit(info, a.json, f"run {run.path}: checkpoints at epochs {info['checkpoints']}")
    return 0


def _load_attack_of(data_dir: Path):
    from PIL import Image

    from .attacks.poisoned_encoder import AttackConfig, load_truth

    truth = load_truth(data_dir)
    cfg = AttackConfig.from_dict(truth["attack"])
    trig = None
    if (data_dir / "trigger.png").exists():
        import numpy as np

        trig = np.array(Image.open(data_dir / "trigger.png").convert("RGB"))
    return cfg, trig, truth


def cmd_instance(a: argparse.Namespace) -> int:
    from .engine.backdoor import (
        backdoor_strength,
        find_instances,
        knn_bank,
        with_optimized_references,
    )
    from .run import Run

    if a.count < 1:
        raise ConfigError(f"--count must be at least 1, got {a.count}.")
    run = Run(a.run)
    if run.manifest["objective"]["name"] == "clip_infonce":
        return _clip_instance(a, run)
    model = run.load_model(run.checkpoints[-1], a.device)
    cfg, trig, truth = _load_attack_of(Path(a.data))
    bank, test = _open_split(a.bank, "train"), _open_split(a.test, "test")
    knn = knn_bank(model, bank)
    found = find_instances(model, cfg, bank, test, trig, a.count, knn=knn,
                           trigger_label=truth.get("pe1_trigger_label"))
    if a.reference == "optimized":
        found = with_optimized_references(model, found, seed=a.seed)
    strength = backdoor_strength(model, cfg, bank, test, trig, knn=knn)
    return _save_instances(a, found, strength, f"asr {strength['asr']:.3f} vs untriggered "
                                                f"{strength['asr_untriggered']:.3f}")


def _save_instances(a: argparse.Namespace, found: list, strength: dict, tail: str) -> int:
    """One instance: written to ``-o``; several: to ``-o/00``, ``-o/01``, ... (pass them all
    to ``trace --instance``)."""
    from .engine.instance import save_instances

    for inst in found:
        inst.meta["strength"] = strength
    if len(found) == 1:
        found[0].save(a.output)
        paths = [a.output]
    else:
        paths = save_instances(found, a.output)
    lines = [f"instance written to {path}: x_b from {inst.meta['x_b_source']}, x_r = "
             f"{inst.meta['x_r_source']} (cos {inst.meta['cos']:.3f})"
             for inst, path in zip(found, paths, strict=True)]
    meta = found[0].meta if len(found) == 1 else {
        "instances": [str(p) for p in paths], "strength": strength,
        "metas": [i.meta for i in found]}
    _emit(meta, a.json, "\n".join(lines + [tail]))
    return 0


def _clip_instance(a: argparse.Namespace, run) -> int:
    from .attacks.clip_attacks import ClipAttackConfig
    from .attacks.poisoned_encoder import load_truth
    from .data.demo_data import CIFAR10_CLASSES
    from .engine.clip_backdoor import clip_backdoor_strength, find_clip_instances
    from .models.clip import load_clip_model

    if a.reference != "nearest":
        raise ConfigError("--reference optimized is implemented for SimCLR runs only.")
    model = load_clip_model(run, run.checkpoints[-1], a.device)
    cfg = ClipAttackConfig.from_dict(load_truth(Path(a.data))["attack"])
    test = _open_split(a.test, "test")
    found = find_clip_instances(model, cfg, test, CIFAR10_CLASSES, a.count)
    strength = clip_backdoor_strength(model, cfg, test, CIFAR10_CLASSES)
    return _save_instances(a, found, strength, f"zero-shot asr {strength['asr']:.3f} vs "
                                                f"clean {strength['asr_untriggered']:.3f}")


def cmd_trace(a: argparse.Namespace) -> int:
    import datetime

    from .data.index import SampleIndex
    from .engine.distributed import local_device, process_group_from_env
    from .engine.instance import load_instance
    from .engine.scoring import Engine
    from .report import format_reference_class_share
    from .run import Run
    from .trace import trace

    method = a.method or default_method_for(Run(a.run))
    m = get_method(method)
    ckpts = a.checkpoints or m.checkpoints
    if ckpts not in ("all", "last"):
        ckpts = [int(x) for x in ckpts.split(",")]
    draws = m.draws if a.draws is None else a.draws
    aggregate = a.aggregate or m.aggregate
    weighting = a.weighting or m.weighting
    combine = a.combine or m.combine
    k = m.k if a.k is None else a.k
    threshold = a.threshold or m.threshold
    timeout = datetime.timedelta(minutes=a.dist_timeout)
    with process_group_from_env(a.device, timeout=timeout) as dist:
        engine = Engine(a.run, checkpoints=ckpts, device=local_device(a.device),
                        backend=a.backend, draws=draws, aggregate=aggregate,
                        batch_size=a.batch_size, seed=a.seed, chunk_batches=a.chunk_batches,
                        workers=a.workers, progress=not a.quiet and dist.is_main,
                        layers=a.layers.split(",") if a.layers else None,
                        precision=a.precision, weighting=weighting, combine=combine,
                        compile_backbone=a.compile)
        summary = trace(engine, SampleIndex(a.index), [load_instance(p) for p in a.instance],
                        a.output, k=k, instance_paths=a.instance, dist=dist,
                        skip_unreadable=a.skip_unreadable_shards, threshold=threshold)
    if summary is None:  # ranks other than 0: rank 0 reports
        return 0
    lines = [f"flagged {summary['n_flagged']} of {summary['n']} inputs (threshold "
             f"{summary['threshold']:.4g}, k={k:g}); results in {a.output}"]
    if summary.get("split"):
        sp = summary["split"]
        lines.append(f"Otsu's split of the {sp['n_flagged_mad']} MAD-flagged scores at "
                     f"{sp['threshold']:.4g} (eta {sp['eta']:.3f}): "
                     + ("applied" if sp["applied"] else "not clear enough, MAD flags kept"))
    if summary.get("reference_class") and summary["n_flagged"]:
        lines.append(format_reference_class_share(summary["reference_class"]))
    if len(a.instance) != m.instances:
        # the detection figures in docs/RESULTS.md are for the method's own instance count
        lines.append(f"method {method} was measured (docs/RESULTS.md) with {m.instances} "
                     f"instance(s); {len(a.instance)} given, their scores combined by "
                     f"{combine}.")
    lines.append((Path(a.output) / "domains.txt").read_text().rstrip())
    _emit(summary, a.json, "\n".join(lines))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_metrics

    m = evaluate(a.truth, a.results)
    _emit(m, a.json, format_metrics(m))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    if a.attack is None:
        a.attack = "ct" if a.modality == "clip" else "pe2"
    if a.modality == "clip":
        from .clip_demo import run_clip_demo

        if a.attack not in ("ct", "corruptencoder"):
            raise ConfigError(f"the CLIP demo runs --attack ct or corruptencoder, not "
                              f"{a.attack!r}.")
        kw = {} if a.epochs is None else {"epochs": a.epochs}
        if a.method is not None:
            kw["method"] = a.method
        res = run_clip_demo(attack=a.attack, workdir=a.workdir, poison_rate=a.poison_rate,
                            progress=not a.quiet,
                            **kw, **({} if a.model is None else {"model": a.model}))
        _emit({k: v for k, v in res.items() if k != "report"}, a.json, res["report"])
        return 0
    if a.attack not in ("pe1", "pe2"):
        raise ConfigError(f"the SimCLR demo runs --attack pe1 or pe2, not {a.attack!r}; "
                          "for ct / corruptencoder add --modality clip.")
    from .demo import run_demo

    res = run_demo(attack=a.attack, workdir=a.workdir, from_scratch=a.from_scratch,
                   poison_rate=a.poison_rate, epochs=a.epochs, model=a.model or "small",
                   method=a.method or DEFAULT_METHOD, progress=not a.quiet)
    _emit({k: v for k, v in res.items() if k != "report"}, a.json, res["report"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ffengine", description=(
        "Trace backdoors in vision foundation models back to their poisoned pre-training "
        "inputs (FoundationForensics)."))
    p.add_argument("--version", action="version", version=f"ffengine {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--json", action="store_true",
                       help="also print one JSON object as the last line")
        q.add_argument("--quiet", action="store_true", help="no progress bars")

    q = sub.add_parser("index", help="index WebDataset-style tar shards")
    q.add_argument("shards", nargs="+")
    q.add_argument("-o", "--output", required=True, help="index directory to write")
    q.add_argument("--no-verify", action="store_true",
                   help="do not decode every image while indexing")
    common(q)
    q.set_defaults(func=cmd_index)

    q = sub.add_parser("poison", help="add PoisonedEncoder poisons to a clean data set")
    q.add_argument("--clean", help="index of the clean pre-training data (default: bundled)")
    q.add_argument("--aux", help="index of the attacker's images (default: bundled)")
    q.add_argument("-o", "--output", required=True)
    _add_attack_args(q)
    common(q)
    q.set_defaults(func=cmd_poison)

    q = sub.add_parser("pretrain", help="SimCLR or CLIP pre-training with checkpoints "
                                        "(resumes)")
    q.add_argument("--index", required=True)
    q.add_argument("-o", "--output", required=True, help="run directory")
    q.add_argument("--modality", default="simclr", choices=["simclr", "clip"])
    q.add_argument("--model", default=None,
                   help="SimCLR: resnet18, small (default), mini or tiny; CLIP: an open_clip "
                        "model name (default ffclip-vit-tiny)")
    q.add_argument("--epochs", type=int, default=None, help="default: 75 (SimCLR), 30 (CLIP)")
    q.add_argument("--batch-size", type=int, default=None, help="default: 256")
    q.add_argument("--lr", type=float, default=None, help="default: 1e-3")
    q.add_argument("--weight-decay", type=float, default=None,
                   help="default: 1e-6 (SimCLR, Adam), 0.1 (CLIP, AdamW)")
    q.add_argument("--schedule", default=None, choices=["constant", "cosine"],
                   help="per-epoch learning rate; default: constant (SimCLR), cosine (CLIP)")
    q.add_argument("--temperature", type=float, default=None,
                   help="SimCLR's NT-Xent temperature (default 0.5); CLIP learns its own")
    q.add_argument("--ckpt-every", type=int, default=None,
                   help="epochs between checkpoints; default: 15 (SimCLR), 5 (CLIP)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU, AMX CPUs)")
    q.add_argument("--device", default="cpu")
    common(q)
    q.set_defaults(func=cmd_pretrain)

    q = sub.add_parser("instance", help="find a backdoor instance (x_b, x_r)")
    q.add_argument("--run", required=True)
    q.add_argument("--data", required=True, help="the poisoned data directory (truth.json)")
    q.add_argument("--bank", help="labelled clean images for k-NN (default: bundled train)")
    q.add_argument("--test", help="labelled test images (default: bundled test)")
    q.add_argument("-o", "--output", required=True)
    q.add_argument("--count", type=int, default=1,
                   help="instances from different triggered images (several: -o/00, -o/01, "
                        "...; PE-I has one)")
    q.add_argument("--reference", default="nearest", choices=["nearest", "optimized"],
                   help="x_r: the nearest clean image (default) or noise optimized to match "
                        "x_b (Adam, lr 1e-3, 100 steps: the paper's Table 7 ablation)")
    q.add_argument("--seed", type=int, default=0, help="seed of --reference optimized")
    q.add_argument("--device", default="cpu")
    common(q)
    q.set_defaults(func=cmd_instance)

    q = sub.add_parser("trace", help="score, flag and aggregate by domain (resumes; runs "
                       "sharded under torchrun)")
    q.add_argument("--run", required=True)
    q.add_argument("--index", required=True)
    q.add_argument("--instance", required=True, nargs="+", help="one or more instance dirs")
    q.add_argument("-o", "--output", required=True)
    q.add_argument("--method", default=None, choices=sorted(METHODS),
                   help=f"named scoring method (default: {DEFAULT_METHOD} for SimCLR runs, "
                        f"{DEFAULT_CLIP_METHOD} for CLIP runs); the seven options below "
                        "override its settings")
    q.add_argument("--k", type=float, default=None, help="MAD multiplier (paper: 3)")
    q.add_argument("--checkpoints", default=None, help="all, last, or epochs like 15,75")
    q.add_argument("--draws", type=int, default=None, help="augmentation draws per sample")
    q.add_argument("--aggregate", default=None, choices=AGGREGATES,
                   help="how draws combine")
    q.add_argument("--weighting", default=None, choices=CHECKPOINT_WEIGHTS,
                   help="how checkpoints count: lr (Eq. 5) or rise (also by how much "
                        "cos(f(x_b), f(x_r)) rose since the previous checkpoint)")
    q.add_argument("--combine", default=None, choices=COMBINES,
                   help="how several instances' scores make one: mean, or min (a sample must "
                        "raise every instance's cosine)")
    q.add_argument("--threshold", default=None, choices=THRESHOLD_RULES,
                   help="how the flagged set is cut: mad (median + k*MAD, the paper's) or "
                        "mad-split (of those, the ones above Otsu's split of their scores "
                        "where it is clear; an experiment, docs/PREREGISTRATION.md)")
    q.add_argument("--batch-size", type=int, default=None,
                   help="scoring batch: the negatives (default: pre-training batch size)")
    q.add_argument("--chunk-batches", type=int, default=16,
                   help="batches per chunk: the unit of resumption and of sharding")
    q.add_argument("--dist-timeout", type=float, default=24 * 60,
                   help="minutes a process waits for the others under torchrun")
    q.add_argument("--skip-unreadable-shards", action="store_true",
                   help="record the samples of a shard that cannot be read as skipped "
                        "(a shard lost for good) instead of stopping so that a resume "
                        "retries it")
    q.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="ghost-score backend: auto (the first of a preference list that "
                        "passes a self-check), torch, cpu (compiled C++), triton (CUDA), "
                        "cuda (CUDA C++, compiled at first use where nvcc is found)")
    q.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="bfloat16: the backbone under bf16 autocast (GPU, AMX CPUs)")
    q.add_argument("--compile", default="auto", choices=COMPILE_MODES,
                   help="run the backbone and the views' colour stage through "
                        "torch.compile: auto (SimCLR runs on a GPU, from 50,000 backbone "
                        "images: the compile takes 15-35 s; eager on a CPU, where compiling "
                        "no longer pays), on, off")
    q.add_argument("--layers", default=None,
                   help="scored layers, comma-separated module paths (default: the run's, "
                        "e.g. head.fc1,head.bn,head.fc2)")
    q.add_argument("--device", default="cpu")
    q.add_argument("--workers", type=int, default=None,
                   help="image-decoding processes (default: 0 on a CPU, up to 12 on a GPU)")
    q.add_argument("--seed", type=int, default=0)
    common(q)
    q.set_defaults(func=cmd_trace)

    q = sub.add_parser("eval", help="DACC, FPR, FNR, AUC of a trace against the truth")
    q.add_argument("--truth", required=True, help="truth.json (or its directory)")
    q.add_argument("results", help="a trace result directory")
    common(q)
    q.set_defaults(func=cmd_eval)

    q = sub.add_parser("demo", help="poison -> pretrain -> instance -> trace -> eval")
    q.add_argument("--modality", default="simclr", choices=["simclr", "clip"])
    q.add_argument("--attack", default=None, choices=["pe1", "pe2", "ct", "corruptencoder"],
                   help="default: pe2 (SimCLR), ct (CLIP)")
    q.add_argument("--workdir", default="ffengine-demo")
    q.add_argument("--method", default=None, choices=sorted(METHODS),
                   help=f"scoring method (default: {DEFAULT_METHOD} for SimCLR, "
                        f"{DEFAULT_CLIP_METHOD} for CLIP, which takes one-draw methods only)")
    q.add_argument("--from-scratch", action="store_true",
                   help="pre-train instead of using the bundled run")
    q.add_argument("--poison-rate", type=float, default=None)
    q.add_argument("--epochs", type=int, default=None,
                   help="whenever the demo pre-trains (CLIP always; SimCLR with "
                        "--from-scratch, or a setting without a bundled run: pe1, or a "
                        "poison rate other than 10%%); ignored with a bundled run")
    q.add_argument("--model", default=None,
                   help="whenever the demo pre-trains, as for --epochs: the model (default: "
                        "small for SimCLR, ffclip-vit-tiny for CLIP)")
    common(q)
    q.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FFEngineError as e:
        if args.debug:
            raise
        print(f"ffengine {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
