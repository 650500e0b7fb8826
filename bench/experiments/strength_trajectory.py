"""Experiment: how the backdoor's strength grows over a run's checkpoints.

    python bench/experiments/strength_trajectory.py [--every 15] [--after E] [CONFIG ...]

For each cached SimCLR run of ``bench/detection.py`` (with no CONFIG: the runs of the
``longer`` grid, pre-trained to 150 epochs), the attack's success rate (k-NN, k = 20, as the
harness measures it at the final checkpoint) at every ``--every``-th epoch: whether the
backdoor is still strengthening when the run stops (``--after``: only epochs after E).
Reads the cached runs; trains nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from detection import GRIDS, trigger_image  # noqa: E402

from ffengine.data.demo_data import demo_index  # noqa: E402
from ffengine.engine.backdoor import backdoor_strength, knn_bank  # noqa: E402
from ffengine.run import Run  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "detection"


def trajectory(config: str, every: int, after: int = 0) -> list[tuple[int, float, float]]:
    cfg = next(c for g in GRIDS.values() for c in g if c.name == config)
    work = CACHE / config
    trig = trigger_image(work)
    run = Run(work / "run")
    bank, test = demo_index("train"), demo_index("test")
    out = []
    for ckpt in run.checkpoints:
        if ckpt.epoch % every or ckpt.epoch <= after:
            continue
        model = run.load_model(ckpt)
        s = backdoor_strength(model, cfg.attack_config(), bank, test, trig,
                              knn=knn_bank(model, bank))
        out.append((ckpt.epoch, s["asr"], s["asr_untriggered"]))
        print(f"{config} epoch {ckpt.epoch:3d}: ASR {s['asr']:.3f}, untriggered "
              f"{s['asr_untriggered']:.3f}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*")
    p.add_argument("--every", type=int, default=15)
    p.add_argument("--after", type=int, default=0)
    a = p.parse_args()
    for config in a.configs or [c.name for c in GRIDS["longer"]]:
        trajectory(config, a.every, a.after)


if __name__ == "__main__":
    main()
