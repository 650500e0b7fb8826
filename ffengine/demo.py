"""``ffengine demo``: poison -> pre-train -> instance -> trace -> eval on the bundled data.

By default the pre-training step uses the run bundled for the attack (made by this
package's own ``pretrain``, its command in its manifest), after checking that the freshly
poisoned index has the hash the run was trained on; ``--from-scratch`` pre-trains anew.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .attacks.poisoned_encoder import AttackConfig, load_truth, poison_dataset
from .data.demo_data import DEMO_ROOT, demo_index
from .data.index import SampleIndex
from .engine.backdoor import backdoor_strength, find_instances, knn_bank
from .engine.instance import save_instances
from .engine.scoring import Engine
from .engine.store import instances_digest
from .errors import ManifestMismatchError
from .evaluate import evaluate, format_metrics
from .methods import DEFAULT_METHOD, get_method
from .pretrain.simclr import PretrainConfig, pretrain
from .report import format_reference_class_share
from .run import Run
from .trace import trace

BUNDLED_RUNS = DEMO_ROOT.parent / "demo-runs"
# the smallest poison rate at which PE-II took at this scale (README, "Measured")
DEFAULT_POISON_RATE = 0.10


def bundled_run(attack: str, poison_rate: float) -> Path | None:
    path = BUNDLED_RUNS / f"{attack}-{round(poison_rate * 100):d}"
    return path if (path / "manifest.json").exists() else None


def run_demo(attack: str = "pe2", workdir: str | Path = "ffengine-demo",
             from_scratch: bool = False, poison_rate: float | None = None,
             epochs: int | None = None, model: str = "small", method: str = DEFAULT_METHOD,
             progress: bool = True) -> dict:
    """``method``: a named scoring method of :mod:`ffengine.methods` (checkpoints, draws,
    instances, k)."""
    t0 = time.perf_counter()
    m = get_method(method)
    rate = DEFAULT_POISON_RATE if poison_rate is None else poison_rate
    # one sub-directory per attack setting: re-running reuses what is there (a finished
    # trace is not redone), and another setting never meets results of the first
    work = Path(workdir) / f"{attack}-r{round(rate * 100):02d}"
    cfg = AttackConfig(attack=attack, poison_rate=rate)
    timings = {}

    t = time.perf_counter()
    data_dir = work / "data"
    if (data_dir / "truth.json").exists() and load_truth(data_dir)["attack"] == cfg.to_dict():
        truth = load_truth(data_dir)  # the same attack was already written here
    else:
        truth = poison_dataset(demo_index("train"), demo_index("aux"), data_dir, cfg)
    index = SampleIndex(data_dir / "index")
    timings["poison_s"] = time.perf_counter() - t

    t = time.perf_counter()
    shipped = None if from_scratch else bundled_run(attack, rate)
    if shipped is not None:
        run = Run(shipped)
        try:
            run.check_index(index.hash, index.path)
        except ManifestMismatchError as e:
            raise ManifestMismatchError(
                f"{e} The bundled run cannot be used with the data poisoned here (a different "
                "image encoder can change the bytes); run the demo with --from-scratch.") from e
    else:
        pcfg = PretrainConfig(model=model, epochs=epochs or 75, ckpt_every=15)
        run = pretrain(index, work / "run", pcfg, command="ffengine demo --from-scratch",
                       progress=progress)
    timings["pretrain_s"] = time.perf_counter() - t

    t = time.perf_counter()
    model_final = run.load_model(run.checkpoints[-1])
    trig = (np.array(Image.open(data_dir / "trigger.png").convert("RGB"))
            if (data_dir / "trigger.png").exists() else None)
    bank, test = demo_index("train"), demo_index("test")
    knn = knn_bank(model_final, bank)
    strength = backdoor_strength(model_final, cfg, bank, test, trig, knn=knn)
    found = find_instances(model_final, cfg, bank, test, trig, m.instances, knn=knn,
                           trigger_label=truth.get("pe1_trigger_label"))
    inst_paths = save_instances(found, work / "instances")
    inst = found[0]
    timings["instance_s"] = time.perf_counter() - t

    t = time.perf_counter()
    engine = Engine(run, progress=progress, **m.engine_options())
    # one directory per run, method and instance set: a re-run resumes or reuses it, and
    # other settings never meet its results
    trace_dir = work / (f"trace-{method}-{instances_digest(found)}"
                        + ("-bundled" if shipped is not None else ""))
    summary = trace(engine, index, found, trace_dir, k=m.k, instance_paths=inst_paths,
                    threshold=m.threshold)
    timings["trace_s"] = time.perf_counter() - t
    metrics = evaluate(data_dir, trace_dir)
    timings["total_s"] = time.perf_counter() - t0

    res = {**metrics, **strength, "attack": attack, "poison_rate": rate, "method": method,
           "n_instances": len(found),
           "run": str(run.path), "bundled_run": shipped is not None,
           "trace": str(trace_dir),
           "x_b": inst.meta["x_b_source"], "x_r": inst.meta["x_r_source"],
           "top_domain": summary["top_domains"][0]["domain"] if summary["top_domains"] else None,
           "suspicious_domains": summary.get("suspicious_domains"),  # None: an older trace
           **{k: round(v, 1) for k, v in timings.items()}}
    domains = (trace_dir / "domains.txt").read_text().rstrip()
    res["report"] = "\n".join([
        f"attack {attack.upper()} at {rate:.0%} poison: {truth['n']} samples, "
        f"{len(truth['poisoned_ids'])} poisoned",
        f"backdoor strength: triggered -> target {strength['asr']:.1%}, untriggered "
        f"{strength['asr_untriggered']:.1%}",
        f"instance: x_b from {inst.meta['x_b_source']}, x_r = {inst.meta['x_r_source']} "
        f"(cos {inst.meta['cos']:.3f})"
        + (f" and {len(found) - 1} more" if len(found) > 1 else ""),
        f"scoring method {method}: {m.describe()}",
        *([format_reference_class_share(summary["reference_class"])]
          if summary.get("reference_class") and summary["n_flagged"] else []),
        domains,
        format_metrics(metrics),
        f"wall time {timings['total_s']:.0f} s; results in {work}",
    ])
    return res


def main_json(res: dict) -> str:
    return json.dumps({k: v for k, v in res.items() if k != "report"}, sort_keys=True)
