"""The bundled demo data: a compact subset of CIFAR-10 (Krizhevsky, 2009) inside the package,
so the demo runs on a machine without the original shards.

Three splits, each an index over a pack of the original JPEG bytes (no re-encoding):
``train`` (the pre-training set), ``aux`` (the attacker's own images: trigger carriers and
target-class references) and ``test`` (backdoor instances and attack-success measurement).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .index import PackedSample, SampleIndex, write_pack
from .shards import iter_shard

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
DEMO_ROOT = Path(__file__).resolve().parent.parent / "assets" / "cifar10-demo"
# split -> (source shards, first sample, number of samples)
DEMO_SPLITS = {
    "train": (["train-000000.tar"], 0, 5000),
    "aux": (["train-000001.tar"], 0, 2000),
    "test": (["test-000000.tar"], 0, 1000),
}


def demo_index(split: str) -> SampleIndex:
    """Open one split of the bundled demo data."""
    if split not in DEMO_SPLITS:
        raise DataError(f"unknown demo split {split!r}; expected one of {list(DEMO_SPLITS)}.")
    path = DEMO_ROOT / split
    if not (path / "metadata.json").exists():
        raise DataError(f"the bundled demo data is missing at {path}; reinstall ffengine or "
                        "rebuild it with `python -m ffengine.data.demo_data CIFAR10_SHARD_DIR`.")
    return SampleIndex(path)


def build_demo_data(src: str | Path, out: str | Path = DEMO_ROOT) -> None:
    """Re-create the bundled splits from the CIFAR-10 tar shards in ``src``."""
    src, out = Path(src), Path(out)
    for split, (shards, start, count) in DEMO_SPLITS.items():
        write_pack(_take(src, shards, start, count), out / split)


def _take(src: Path, shards: list[str], start: int, count: int):
    seen = 0
    for name in shards:
        path = src / name
        with open(path, "rb") as fh:
            for s in iter_shard(path):
                if seen >= start + count:
                    return
                if seen >= start:
                    off, size = s.image_range()
                    fh.seek(off)
                    yield PackedSample(key=s.key, image=fh.read(size),
                                       label=int(s.small["cls"]), domain="cifar10")
                seen += 1


if __name__ == "__main__":
    import sys

    build_demo_data(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else DEMO_ROOT)
