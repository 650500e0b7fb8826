"""A tiny real trace setup shared by the resume and distributed tests: CIFAR-10 images in two
domains plus one undecodable sample, a two-checkpoint run of the tiny model, and one
backdoor instance (two of the images). Builds in a few seconds on one CPU core."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ffengine.data.demo_data import demo_index
from ffengine.data.index import PackedSample, SampleIndex, write_pack
from ffengine.engine.instance import Instance, load_instance
from ffengine.pretrain.simclr import PretrainConfig, pretrain
from ffengine.run import Run

TINY = PretrainConfig(model="tiny", epochs=2, batch_size=32, ckpt_every=1, seed=5)
N_IMAGES = 120
BAD_ID = 37  # the undecodable sample


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def build(root: Path) -> dict:
    src = demo_index("train")
    samples = []
    for i in range(N_IMAGES + 1):
        if i == BAD_ID:
            samples.append(PackedSample(key="broken", image=b"not an image",
                                        domain="broken.example"))
            continue
        j = i if i < BAD_ID else i - 1
        samples.append(PackedSample(key=src.key(j), image=_png(src.image(j)),
                                    label=int(src.labels[j]),
                                    domain="a.example" if j % 3 else "b.example"))
    index = write_pack(samples, root / "index")
    run = pretrain(index, root / "run", TINY, progress=False)
    inst = Instance(src.image(200), src.image(201), {"x_b_source": "train 200"})
    inst.save(root / "instance")
    return {"root": root, "index": SampleIndex(root / "index"), "run": run, "instance": inst,
            "n": N_IMAGES + 1}


def shared_setup(tmp_path_factory) -> dict:
    """:func:`build` once per pytest session (shared by the test modules that use it)."""
    root = tmp_path_factory.getbasetemp() / "trace-setup"
    if not (root / "complete").exists():
        root.mkdir(exist_ok=True)
        build(root)
        (root / "complete").touch()
    return {"root": root, "index": SampleIndex(root / "index"), "run": Run(root / "run"),
            "instance": load_instance(root / "instance"), "n": N_IMAGES + 1}


def shared_reference(tmp_path_factory, setup: dict) -> Path:
    """An uninterrupted single-process `ffengine trace` of ``setup``, once per session."""
    out = tmp_path_factory.getbasetemp() / "trace-reference"
    if not (out / "summary.json").exists():
        r = run_cli(trace_args(setup, out))
        if r.returncode != 0:
            raise RuntimeError(f"reference trace failed: {r.stderr}")
    return out


def trace_args(setup: dict, out: Path, *extra: str) -> list[str]:
    """Arguments of `ffengine trace` for ``setup`` with many small pieces."""
    root = setup["root"]
    return ["trace", "--run", str(root / "run"), "--index", str(root / "index"),
            "--instance", str(root / "instance"), "-o", str(out), "--batch-size", "4",
            "--chunk-batches", "1", "--method", "paper", "--draws", "2", "--quiet", "--json",
            *extra]


RESULT_ARRAYS = ("terms.npy", "scores.npy", "detection_scores.npy", "flagged.npy")


def assert_same_results(a: Path, b: Path) -> None:
    """The result arrays and domain tables of two trace directories are byte-identical."""
    for name in (*RESULT_ARRAYS, "domains.json", "domains.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def env() -> dict[str, str]:
    """Environment of child processes: one thread each (the machine is shared, and equal
    thread counts keep single- and multi-process runs comparable), this checkout first."""
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"
    repo = str(Path(__file__).resolve().parents[1])
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, e.get("PYTHONPATH")]))
    return e


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ffengine", *args], env=env(),
                          capture_output=True, text=True, timeout=timeout)


def with_cos(engine, cos):
    """``engine`` whose prepare() reports ``cos`` (T, K) instead of the run's own: runs this
    short barely move the cosine, and checkpoint weighting by its rise needs it to."""
    prepare = engine.prepare

    def patched(*args, **kwargs):
        state = prepare(*args, **kwargs)
        state.cos = cos.copy()
        return state

    engine.prepare = patched
    return engine
