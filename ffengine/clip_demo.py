"""The CLIP demo: poison -> pre-train -> instance -> score -> MAD flag -> eval, on the
bundled image-caption set (CIFAR-10 demo splits captioned with CLIP's prompt templates,
:mod:`ffengine.data.captions`).

The scoring is the Engine's (:mod:`ffengine.engine.scoring`) with CLIP's objective, traced
into ``workdir/trace`` like the SimCLR demo. ``run_clip_demo(attack="ct"|"corruptencoder",
workdir=...)`` returns DACC, FPR, FNR, AUC,
the backdoor's zero-shot strength (triggered vs. clean) and the wall time of each step.
Each step reuses what an earlier call left in ``workdir`` (the poisoned data when its attack
config matches; the run resumes from its last checkpoint).
"""

from __future__ import annotations

import time
from pathlib import Path

from .attacks.clip_attacks import ClipAttackConfig, poison_clip_dataset
from .attacks.poisoned_encoder import load_truth
from .data.demo_data import CIFAR10_CLASSES, demo_index
from .data.index import SampleIndex
from .engine.clip_backdoor import clip_backdoor_strength, find_clip_instances
from .engine.instance import save_instances
from .engine.scoring import Engine
from .engine.store import instances_digest
from .errors import ConfigError
from .evaluate import evaluate
from .methods import DEFAULT_CLIP_METHOD, METHODS, get_method
from .models.clip import load_clip_model
from .pretrain.clip import ClipPretrainConfig, pretrain_clip
from .trace import trace

# the smallest rates tried at which each backdoor took at this scale (README, "Measured"):
# CorruptEncoder at 5% gave 15.5% triggered vs 5.5% clean; at 15%, 85.0% vs 2.3%
DEFAULT_POISON_RATE = {"ct": 0.05, "corruptencoder": 0.15}


def run_clip_demo(attack: str = "ct", workdir: str | Path = "ffengine-clip-demo",
                  epochs: int = 30, poison_rate: float | None = None,
                  model: str = "ffclip-vit-tiny", batch_size: int = 256, lr: float = 1e-3,
                  ckpt_every: int | None = None, method: str = DEFAULT_CLIP_METHOD,
                  n_train: int | None = None, n_test: int | None = None, seed: int = 0,
                  device: str = "cpu", progress: bool = True) -> dict:
    """Run the whole CLIP traceback on the bundled data; returns metrics and a report.

    ``n_train`` / ``n_test``: use only the first samples of the demo's train / test splits
    (tests and quick looks); ``ckpt_every`` defaults to a fifth of ``epochs``. ``method``: a
    named scoring method of :mod:`ffengine.methods` with one draw (CLIP scores a fixed view).
    """
    m = get_method(method)
    if m.draws != 1:
        raise ConfigError(f"method {method!r} takes {m.draws} augmentation draws, but CLIP "
                          f"scores one fixed view of each image; pick a one-draw method "
                          f"({', '.join(n for n, x in METHODS.items() if x.draws == 1)}).")
    t0 = time.perf_counter()
    work = Path(workdir)
    rate = DEFAULT_POISON_RATE[attack] if poison_rate is None else poison_rate
    cfg = ClipAttackConfig(attack=attack, modality="clip", poison_rate=rate, seed=seed)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    clean, test = _split("train", n_train, work / "clean"), _split("test", n_test, work / "test")
    data_dir = work / "data"
    if (data_dir / "truth.json").exists() and load_truth(data_dir)["attack"] == cfg.to_dict():
        truth = load_truth(data_dir)
    else:
        truth = poison_clip_dataset(clean, demo_index("aux"), data_dir, cfg)
    index = SampleIndex(data_dir / "index")
    timings["poison_s"] = time.perf_counter() - t

    t = time.perf_counter()
    pcfg = ClipPretrainConfig(model=model, epochs=epochs, batch_size=batch_size, lr=lr,
                              ckpt_every=ckpt_every or max(1, epochs // 5), seed=seed)
    run = pretrain_clip(index, work / "run", pcfg, device=device,
                        command=f"run_clip_demo(attack={attack!r})", progress=progress)
    timings["pretrain_s"] = time.perf_counter() - t

    t = time.perf_counter()
    final = load_clip_model(run, run.checkpoints[-1], device)
    strength = clip_backdoor_strength(final, cfg, test, CIFAR10_CLASSES)
    found = find_clip_instances(final, cfg, test, CIFAR10_CLASSES, m.instances)
    inst_paths = save_instances(found, work / "instances")
    inst = found[0]
    timings["instance_s"] = time.perf_counter() - t

    t = time.perf_counter()
    engine = Engine(run, device=device, seed=seed, progress=progress, **m.engine_options())
    trace_dir = work / f"trace-{method}-{instances_digest(found)}"
    summary = trace(engine, index, found, trace_dir, k=m.k, instance_paths=inst_paths,
                    threshold=m.threshold)
    timings["score_s"] = time.perf_counter() - t
    metrics = evaluate(data_dir, trace_dir)
    timings["total_s"] = time.perf_counter() - t0
    result = {**metrics, **strength, "attack": attack, "poison_rate": rate,
              "trace": str(trace_dir), "method": method, "n_instances": len(found),
              "model": model, "epochs": epochs, "run": str(run.path),
              "checkpoints": summary["checkpoints"],
              "cos_per_checkpoint": [c[0] for c in summary["cos_per_checkpoint"]],
              "threshold": summary["threshold"],
              "x_b": inst.meta["x_b_source"], "x_r": inst.meta["x_r_source"],
              "backdoor_took_on_x_b": inst.meta["backdoor_took_on_x_b"],
              "top_domain": (summary["top_domains"][0]["domain"]
                             if summary["top_domains"] else None),
              "suspicious_domains": summary.get("suspicious_domains"),  # None: an older trace
              **{name: round(v, 1) for name, v in timings.items()}}
    rows_text = (trace_dir / "domains.txt").read_text().rstrip()
    result["report"] = "\n".join([
        f"CLIP {attack.upper()} at {rate:.0%} poison: {truth['n']} pairs, "
        f"{len(truth['poisoned_ids'])} poisoned; {model}, {epochs} epochs",
        f"backdoor strength (zero-shot): triggered -> target {strength['asr']:.1%}, clean "
        f"{strength['asr_untriggered']:.1%}; clean zero-shot accuracy "
        f"{strength['zero_shot_acc']:.1%}",
        f"instance: x_b from {inst.meta['x_b_source']}, x_r = {inst.meta['x_r_source']} "
        f"(cos {inst.meta['cos']:.3f})" + (f" and {len(found) - 1} more" if len(found) > 1
                                           else ""),
        f"scoring method {method}: {m.describe()}",
        rows_text,
        f"DACC {metrics['dacc']:.4f}  FPR {metrics['fpr']:.4f}  FNR {metrics['fnr']:.4f}  "
        f"AUC {metrics['auc']:.4f}  (flagged {metrics['n_flagged']})",
        f"wall time {timings['total_s']:.0f} s; results in {work}",
    ])
    return result


def _split(split: str, n: int | None, out: Path) -> SampleIndex:
    """A demo split, or its first ``n`` samples (original bytes, labels and keys)."""
    src = demo_index(split)
    if n is None or n >= len(src):
        return src
    if (out / "metadata.json").exists():
        sub = SampleIndex(out)
        if len(sub) == n and sub.keys() == [src.key(i) for i in range(n)]:
            return sub
    from .data.index import PackedSample, write_pack

    return write_pack((PackedSample(src.key(i), src.image_bytes(i), int(src.labels[i]),
                                    "cifar10") for i in range(n)), out)


__all__ = ["run_clip_demo"]
