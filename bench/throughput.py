"""Scoring throughput against plain inference, the autograd reference and vmap, in one run.

    python bench/throughput.py --json                  # both models, every backend here
    python bench/throughput.py --models small --n 5000,50000 --json
    python bench/throughput.py --device cuda --json    # on a GPU (the default where one is)

Every figure counts *backbone images per second* (samples × views × draws: every view
passes the backbone once), so the engine, plain inference and the references are directly
comparable. Each measurement runs in its own process, so ``*_peak_mib`` is that
measurement's own peak resident memory (VmHWM; on a GPU, ``*_gpu_peak_mib`` is the peak
allocated by PyTorch there). The run is a freshly initialized model
saved in the run format (weights do not change the cost), the data ``n`` random 32×32
images in a sample index, the instances random images. On a GPU every measurement computes
in full float32 as the engine does (``ffengine.engine.float32.ieee_float32``: no TF32
convolutions), plain inference too. Prints a human table on stderr and one JSON object on
stdout (``--json``); ``--out FILE`` also keeps it in a file, rewritten after every
measurement.

* ``inference_sps``: the backbone alone, as saved, under inference_mode on the batches the
  engine feeds it (:func:`inference_batch`: 64 views on a CPU, 2048 on a GPU, where the
  engine fuses scoring batches).
* ``inference_folded_sps``: the same with the batch norms folded into the convolutions, as
  the engine's fast path runs the backbone (``fold_batchnorm``): the engine's own backbone
  cost, so the engine's ratio to it is its overhead alone.
* ``engine_sps``: ``Engine(run).score(index, instances)`` per backend (decode, augment,
  backbone, ghost score), K = 1 and K = 8 instances, with the backbone eager; the keys
  ``BACKEND+compile/K=..`` run it through ``torch.compile`` (``compile_backbone="on"``).
  Timed after a warm-up pass on 64 samples that takes the one-off costs (Triton's JIT of
  its kernels; with ``+compile``, the compile: ``compile_s``, else ``warmup_s``).
  ``--workers`` decoding processes (0: in the scoring process). ``engine_data_wait_s``:
  how long the timed pass waited for decoded chunks, ``engine_first_chunk_s`` of it for
  the first (start-up); the rest of a pass waiting means decoding did not keep up.
* ``inference_compiled_sps``: plain inference through ``torch.compile`` (after warm-up).
* ``reference_sps``: the same Engine with ``reference=True`` (per-sample autograd on the
  head, materialized gradients), on ``--n-slow`` samples.
* ``vmap_sps``: per-sample head gradients materialized with ``torch.func.vmap(grad(...))``
  and dotted with the cosine gradient, on ``--n-slow`` samples.
* ``naive_sps``: one sample at a time, as plain autograd code would do it: the sample's two
  views through backbone and head, ``autograd.grad`` of its loss on the scored parameters
  (the batch's other views as constant negatives, embedded once per batch), the dot with
  the cosine gradient and the norm; on ``--n-slow`` samples. ``reference_sps`` shares the
  backbone pass across the batch, so only its head maths is per sample.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_name  # bench/machine.py: bench/ is on sys.path when these run

ROOT = Path(__file__).resolve().parent.parent


def _peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _sync(device) -> None:
    """Wait for the device's queued work, so that a timer reads finished work."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def fed_engine(batches: list | None, waits: list[float]):
    """Engine.score's loader replaced: fed from ``batches`` (decoded beforehand) when given,
    else the real loader with the time spent waiting for each chunk added to ``waits``."""
    import ffengine.engine.scoring as scoring

    real = scoring.iter_chunks

    def timed(*args, **kwargs):  # the real loader made now: its workers start at the call
        return waited(iter(batches) if batches is not None else iter(real(*args, **kwargs)))

    def waited(it):
        while True:
            t0 = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                return
            waits.append(time.perf_counter() - t0)
            yield b

    scoring.iter_chunks = timed
    try:
        yield
    finally:
        scoring.iter_chunks = real


def build_setup(root: Path, model: str, n: int, seed: int = 0) -> None:
    """A one-checkpoint run of ``model`` (fresh init) and an index of ``n`` random images."""
    import torch

    from ffengine.data.augment import AugmentConfig
    from ffengine.data.index import index_arrays
    from ffengine.engine.instance import Instance
    from ffengine.models.resnet import MODEL_PRESETS, build_model
    from ffengine.run import new_manifest, save_checkpoint

    rng = np.random.default_rng(seed)
    # random pixels compress badly; a smooth random field decodes like a photo
    base = rng.integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
    images = (base[rng.integers(0, 64, n)] // 2 + rng.integers(0, 128, (n, 1, 1, 3))).astype(
        np.uint8)
    # JPEG, as the demo's CIFAR-10 images (and faster to write than PNG: 20,000 in 5.6 s
    # against 8.7 s on the 2-core dev VM)
    index = index_arrays(images, root / "index", labels=np.zeros(n, int), image_format="jpeg")
    torch.manual_seed(seed)
    cfg = MODEL_PRESETS[model]
    net = build_model(cfg)
    run_dir = root / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = new_manifest(cfg, AugmentConfig(), str(index.path), index.hash, 0.5,
                            {"batch_size": 256}, "bench/throughput.py")
    save_checkpoint(run_dir, manifest, net, None, 1, 1, 1e-3)
    for k in range(8):
        Instance(base[k], base[k + 8], {}).save(root / "instances" / f"{k:02d}")


def measure(root: Path, what: str, backend: str, K: int, n_slow: int,
            device: str = "cpu", workers: int = 0) -> dict:
    """One measurement in this process, on ``device``: images/s and peak MiB."""
    import torch

    from ffengine.data.index import SampleIndex
    from ffengine.engine.float32 import ieee_float32
    from ffengine.engine.instance import load_instance
    from ffengine.engine.scoring import Engine
    from ffengine.run import Run

    run = Run(root / "run")
    index = SampleIndex(root / "index")
    insts = [load_instance(root / "instances" / f"{k:02d}") for k in range(K)]
    backend, _, compiled = backend.partition("+")  # "torch+compile": compiled backbone
    extra: dict = {}
    if what in ("inference", "inference-folded"):
        # the memory format and batch the engine feeds the backbone on this device: 64 views
        # on a CPU, 2048 views of fused batches on a GPU
        from ffengine.engine.objective import objective_for
        from ffengine.engine.simclr_objective import backbone_memory_format

        fmt = backbone_memory_format(device)
        model = run.load_model(run.checkpoints[-1], device).to(memory_format=fmt)
        if what == "inference-folded":  # as the engine's fast path runs it
            model = objective_for(run).scoring_model(model)
        step = inference_batch(device)
        x = torch.rand(step, 3, 32, 32, device=device).contiguous(memory_format=fmt)
        n_views = 2 * len(index)
        forward = torch.compile(model.features) if compiled else model.features
        # full float32 on a GPU, as the engine computes (no TF32 convolutions)
        with torch.inference_mode(), ieee_float32(device):
            t0 = time.perf_counter()
            forward(x)  # warm-up (compiles)
            _sync(device)
            extra["compile_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(max(1, n_views // step)):
                forward(x)
            _sync(device)
            dt = time.perf_counter() - t0
        images = step * max(1, n_views // step)
    elif what in ("engine", "reference"):
        sub = index if what == "engine" else _head(index, n_slow, root)
        eng = Engine(run, checkpoints="last", backend=backend, progress=False,
                     reference=what == "reference", device=device, workers=workers,
                     compile_backbone="on" if compiled else "off")
        # a small pass first, timed apart: the figure is the steady state, without the
        # one-off compiles (torch.compile's of the backbone, Triton's JIT of its kernels)
        t0 = time.perf_counter()
        eng.score(_head(index, 64, root), insts, check_index=False)
        _sync(device)
        extra["warmup_s" if not compiled else "compile_s"] = time.perf_counter() - t0
        if compiled and not eng.backbone_compiled:
            raise RuntimeError(f"the backbone did not compile: {eng.backbone_fallback}")
        waits: list[float] = []
        with fed_engine(None, waits):  # the real loader, its waits timed
            t0 = time.perf_counter()
            eng.score(sub, insts, check_index=False)  # ``sub``: maybe a prefix of the data
            _sync(device)
            dt = time.perf_counter() - t0
        # how long the pass waited for decoded chunks: for the first (the loader's start-up
        # and one chunk's decoding) and for all of them (decoding not keeping up)
        extra["first_chunk_s"], extra["data_wait_s"] = (waits or [0.0])[0], sum(waits)
        images = 2 * len(sub)
    elif what == "vmap":
        with ieee_float32(device):  # the baselines compute in float32 as the engine does
            dt, images = _vmap_scores(run, _head(index, n_slow, root), insts, device)
    elif what == "naive":
        with ieee_float32(device):
            dt, images = _naive_scores(run, _head(index, n_slow, root), insts, device)
    else:
        raise ValueError(what)
    gpu = ({"gpu_peak_mib": torch.cuda.max_memory_allocated(device) / 2 ** 20}
           if torch.device(device).type == "cuda" else {})
    return {"images_per_s": images / dt, "seconds": dt, "images": images,
            "peak_mib": _peak_mib(), **gpu, **extra}


def inference_batch(device) -> int:
    """Views per forward of plain inference: what the engine's backbone takes per forward
    on ``device`` (64 on a CPU; on a GPU, where the engine fuses scoring batches, 2048)."""
    from ffengine.engine.simclr_objective import backbone_batch

    return backbone_batch(device, 32)


def _head(index, n: int, root: Path):
    """The first ``n`` samples of ``index`` as their own index."""
    from ffengine.data.index import PackedSample, SampleIndex, write_pack

    out = root / f"index-first-{n}"
    if not (out / "metadata.json").exists():
        write_pack((PackedSample(index.key(i), index.image_bytes(i), 0, "x")
                    for i in range(min(n, len(index)))), out)
    return SampleIndex(out)


def _scoring_setup(run, index, insts, device: str):
    """The engine on the final checkpoint, its model and cosine gradients, the scored
    parameters (name -> tensor) and their gradients stacked (K, P): what the baselines
    that materialize per-sample gradients start from."""
    import torch

    from ffengine.engine.head import scored_parameters
    from ffengine.engine.scoring import Engine

    # reference=True: the model as saved, as plain autograd code would run it (the fast
    # path folds the backbone's batch norms), loaded once with its cosine gradients
    eng = Engine(run, checkpoints="last", progress=False, device=device, reference=True)
    state = eng.prepare(insts, index)  # a prefix of the run's data: no index check
    model, grads = state.models[0], state.grads[0]
    params = dict(scored_parameters(model, run.manifest["scored_layers"]))
    G = torch.cat([grads[k].reshape(grads[k].shape[0], -1) for k in params], 1)
    return eng, model, grads, params, G


def _vmap_scores(run, index, insts, device: str = "cpu") -> tuple[float, int]:
    """Materialized per-sample head gradients with torch.func, dotted with G: the baseline
    the ghost path replaces. Same views and batches as the engine's."""
    import torch
    from torch.func import functional_call, grad, vmap

    from ffengine.data.loader import iter_chunks
    from ffengine.losses import nt_xent_sample_loss_onehot

    eng, model, grads, params, G = _scoring_setup(run, index, insts, device)
    tau = run.manifest["objective"]["temperature"]
    head_params = {k.removeprefix("head."): v.detach() for k, v in model.head.named_parameters()}
    buffers = {k: v for k, v in model.head.named_buffers()}
    scored = [k.removeprefix("head.") for k in params]

    def loss_i(p, feats, onehot):
        z = functional_call(model.head, ({**head_params, **p}, buffers), (feats,))
        return nt_xent_sample_loss_onehot(z, onehot, tau)

    obj = eng.objective
    images = 0
    t0 = time.perf_counter()
    for batch in iter_chunks(index, eng.chunks(len(index))):
        imgs = batch.images.to(device)
        for sel in np.array_split(np.arange(len(batch)), max(1, round(len(batch) / 256))):
            with torch.inference_mode():
                feats = obj.view_features(model, imgs[sel], batch.sizes[sel], batch.ids[sel],
                                          seed=0, epoch=1, draw=0)
            feats = feats.clone()
            p = {k: head_params[k] for k in scored}
            onehots = torch.eye(len(sel), dtype=feats.dtype, device=feats.device)
            g = vmap(grad(loss_i), in_dims=(None, None, 0))(p, feats, onehots)
            flat = torch.cat([g[k].reshape(len(sel), -1) for k in scored], 1)
            scores = (flat @ G.T) / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
            if images == 0:  # the baseline must compute the same scores as the engine
                want = obj.score_batch(model, index, imgs[sel], batch.sizes[sel],
                                       batch.ids[sel], grads, seed=0, epoch=1, draw=0,
                                       backend="torch", reference=False)
                torch.testing.assert_close(scores.to(want.dtype), want, rtol=1e-4,
                                           atol=1e-5 * float(want.abs().max()))
            images += 2 * len(sel)
    return time.perf_counter() - t0, images


def _naive_scores(run, index, insts, device: str = "cpu") -> tuple[float, int]:
    """One sample at a time with plain autograd (backbone forward of its two views included),
    the same views, negatives and scores as the engine's (checked on the first batch)."""
    import torch

    from ffengine.data.augment import augment_batch, stream_id
    from ffengine.data.loader import iter_chunks
    from ffengine.engine.simclr_objective import SCORE_STREAM
    from ffengine.losses import nt_xent_sample_loss

    eng, model, grads, params, G = _scoring_setup(run, index, insts, device)
    tau = run.manifest["objective"]["temperature"]
    obj = eng.objective
    images, checked = 0, False
    t0 = time.perf_counter()
    for batch in iter_chunks(index, eng.chunks(len(index))):
        imgs = batch.images.to(device)
        for sel in np.array_split(np.arange(len(batch)), max(1, round(len(batch) / 256))):
            views = [augment_batch(imgs[sel], batch.sizes[sel], batch.ids[sel], 0,
                                   stream_id(SCORE_STREAM, 1, 0, v), obj.augment)
                     for v in (0, 1)]
            b = len(sel)
            with torch.no_grad():  # the negatives: every view of the batch, once
                z_all = model.head(model.features(torch.cat(views)))
            scores = torch.zeros(b, G.shape[0], device=G.device)
            for i in range(b):
                x_i = torch.stack([views[0][i], views[1][i]])
                with torch.enable_grad():
                    z_i = model.head(model.features(x_i))
                    z = z_all.index_put((torch.tensor([i, b + i], device=z_all.device),), z_i)
                    g = torch.autograd.grad(nt_xent_sample_loss(z, i, tau),
                                            list(params.values()))
                flat = torch.cat([t.reshape(-1) for t in g])
                norm = torch.linalg.vector_norm(flat)
                if norm > 0:
                    scores[i] = (G @ flat) / norm
            if not checked:  # the baseline must compute the same scores as the engine
                want = obj.score_batch(model, index, imgs[sel], batch.sizes[sel],
                                       batch.ids[sel], grads, seed=0, epoch=1, draw=0,
                                       backend="torch", reference=False)
                torch.testing.assert_close(scores.to(want.dtype), want, rtol=1e-4,
                                           atol=1e-4 * float(want.abs().max()))
                checked = True
            images += 2 * b
    return time.perf_counter() - t0, images


def _child(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"measurement {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="small,resnet18")
    p.add_argument("--n", default="5000,50000",
                   help="samples scored by the engine (comma list; after the first, only "
                        "the first backend at K=1, for peak memory against n)")
    p.add_argument("--n-resnet18", type=int, default=1024,
                   help="samples for the full-width ResNet-18 (slow on CPU)")
    p.add_argument("--n-slow", type=int, default=256, help="samples for reference and vmap")
    p.add_argument("--backends", default=None,
                   help="default: torch,cpu,torch+compile,cpu+compile on CPU; torch,triton,cuda,"
                        "triton+compile on CUDA (+compile: the backbone via torch.compile)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda where it exists)")
    p.add_argument("--workers", type=int, default=0,
                   help="the engine's image-decoding processes (0: decode in the scoring "
                        "process; on a GPU, use several so that decoding keeps up)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", type=Path, default=None,
                   help="also write the JSON object here, rewritten after every measurement "
                        "(a run stopped midway keeps what it measured)")
    p.add_argument("--child", nargs=7,
                   metavar=("ROOT", "WHAT", "BACKEND", "K", "NSLOW", "DEV", "WORKERS"),
                   help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        root, what, backend, k, n_slow, device, workers = a.child
        print(json.dumps(measure(Path(root), what, backend, int(k), int(n_slow), device,
                                 int(workers))))
        return 0

    import torch

    from ffengine import _ext
    from ffengine.io_utils import atomic_write_json

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = torch.device(device).type == "cuda"
    backends = a.backends.split(",") if a.backends else (
        ["torch", "triton", "cuda", "triton+compile"] if on_gpu
        else ["torch", "cpu", "torch+compile", "cpu+compile"])
    if on_gpu or not _ext.extension_available():  # the compiled C++ op: CPU, where built
        backends = [b for b in backends if b.partition("+")[0] != "cpu"]
    card = f", {torch.cuda.get_device_name(device)}" if on_gpu else ""
    out = {"machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads{card}",
           "device": device, "workers": a.workers, "date": time.strftime("%Y-%m-%d"),
           "models": {}}

    def child(root: Path, what: str, backend: str, K: int = 1) -> dict:
        r = _child([str(root), what, backend, str(K), str(a.n_slow), device, str(a.workers)])
        wait = (f", waiting {r['data_wait_s']:.2f} s for data ({r['first_chunk_s']:.2f} s "
                f"for the first chunk)" if "data_wait_s" in r else "")
        print(f"  ({root.name}: {what} {backend} K={K}: {r['images_per_s']:.0f} img/s in "
              f"{r['seconds']:.1f} s{wait})", file=sys.stderr, flush=True)
        return r

    def save() -> None:  # after every measurement: a run stopped midway keeps what it measured
        if a.out is not None:
            atomic_write_json(a.out, out)

    def engine(root: Path, row: dict, b: str, K: int) -> None:
        r = child(root, "engine", b, K)
        row["engine_sps"][f"{b}/K={K}"] = r["images_per_s"]
        row["engine_peak_mib"][f"{b}/K={K}"] = r["peak_mib"]
        # the warm-up pass (one-off costs, timed apart) and the timed pass's waits for data
        for key in ("compile_s", "warmup_s", "first_chunk_s", "data_wait_s"):
            if key in r:
                row.setdefault(f"engine_{key}", {})[f"{b}/K={K}"] = r[key]
        _gpu_peak(row, "engine", r, f"{b}/K={K}")
        save()

    with tempfile.TemporaryDirectory() as tmp:
        for model in a.models.split(","):
            sizes = [int(float(x)) for x in a.n.split(",")] if model != "resnet18" else [
                a.n_resnet18]
            res: dict = {"sizes": {}}
            for n in sizes:
                root = Path(tmp) / f"{model}-{n}"
                build_setup(root, model, n)
                row: dict = {"n": n}
                res["sizes"][str(n)] = row
                out["models"][model] = res
                r = child(root, "inference", "torch")
                row["inference_sps"] = r["images_per_s"]
                row["inference_peak_mib"] = r["peak_mib"]
                _gpu_peak(row, "inference", r)
                save()
                if n == sizes[0]:
                    r = child(root, "inference-folded", "torch")
                    row["inference_folded_sps"] = r["images_per_s"]
                    save()
                row["engine_sps"], row["engine_peak_mib"] = {}, {}
                # the larger sizes show how memory grows with n: one backend, K = 1
                grid = [(b, K) for b in backends for K in (1, 8)] if n == sizes[0] else [
                    (backends[0], 1)]
                # quick measurements first, the compiled ones (a compile each) last: a run
                # stopped at its time limit keeps the most
                for b, K in [bk for bk in grid if "+" not in bk[0]]:
                    engine(root, row, b, K)
                if n == sizes[0]:
                    for what in ("reference", "vmap", "naive"):
                        r = child(root, what, "torch")
                        row[f"{what}_sps"], row[f"{what}_peak_mib"] = r["images_per_s"], r[
                            "peak_mib"]
                        _gpu_peak(row, what, r)
                        save()
                    r = child(root, "inference", "torch+compile")
                    row["inference_compiled_sps"] = r["images_per_s"]
                    row["inference_compile_s"] = r["compile_s"]
                    save()
                for b, K in [bk for bk in grid if "+" in bk[0]]:
                    engine(root, row, b, K)
                _print_row(model, row)
    if a.json:
        print(json.dumps(out, sort_keys=True))
    return 0


def _gpu_peak(row: dict, what: str, r: dict, key: str | None = None) -> None:
    """``row[what_gpu_peak_mib]`` (per ``key`` for the engine) where the child ran on a GPU."""
    if "gpu_peak_mib" not in r:
        return
    if key is None:
        row[f"{what}_gpu_peak_mib"] = r["gpu_peak_mib"]
    else:
        row.setdefault(f"{what}_gpu_peak_mib", {})[key] = r["gpu_peak_mib"]


def _print_row(model: str, row: dict) -> None:
    inf = row["inference_sps"]
    lines = [f"{model} n={row['n']}: inference {inf:.0f} img/s "
             f"({row['inference_peak_mib']:.0f} MiB)"]
    fold = row.get("inference_folded_sps")
    if fold:
        lines.append(f"  inference BN folded {fold:8.0f} img/s  {fold / inf:5.2f}x inference")
    if "inference_compiled_sps" in row:
        lines.append(f"  inference compiled  {row['inference_compiled_sps']:8.0f} img/s  "
                     f"{row['inference_compiled_sps'] / inf:5.2f}x inference  (compile "
                     f"{row['inference_compile_s']:.0f} s)")
    for key, v in row["engine_sps"].items():
        folded = f"  {v / fold:5.2f}x folded" if fold else ""
        lines.append(f"  engine {key:12s} {v:8.0f} img/s  {v / inf:5.2f}x inference{folded}  "
                     f"{row['engine_peak_mib'][key]:.0f} MiB")
    for what in ("reference", "vmap", "naive"):
        if f"{what}_sps" in row:
            v = row[f"{what}_sps"]
            best = max(row["engine_sps"].items(), key=lambda kv: kv[1] if kv[0].endswith(
                "/K=1") else -1)
            lines.append(f"  {what:9s}           {v:8.1f} img/s  engine(torch,K=1) is "
                         f"{row['engine_sps'].get('torch/K=1', float('nan')) / v:.1f}x, "
                         f"({best[0]}) {best[1] / v:.1f}x  {row[f'{what}_peak_mib']:.0f} MiB")
    print("\n".join(lines), file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
