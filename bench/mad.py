"""Streaming exact median/MAD from a .npy file vs. numpy in memory.

    python bench/mad.py --n 10000000 [--dtype float32] [--path P] [--json]

Writes N random scores (Gamma(2, 1), like non-negative detection scores) to a ``.npy`` file
in chunks (a temporary directory, deleted afterwards, unless ``--path`` is given; an existing
file at ``--path`` is reused), then times ``ffengine.detect.robust_stats`` on the file and,
when the array takes less than a quarter of RAM, ``np.median`` + MAD on the loaded array.
Each measurement runs in a fresh subprocess so that ``peak_rss_mib`` (``ru_maxrss``) is its
own; Numba compilation happens before the timer starts. The file was just written or read,
so the page cache is warm: the figures measure compute, not the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GEN_CHUNK = 1 << 22


def _peak_rss_mib() -> float:
    # Linux: VmHWM of this process's own address space. ru_maxrss is no good here: it
    # survives fork+exec, so a measuring child would report its parent's peak (the parent
    # maps the whole generated file). Elsewhere ru_maxrss (KiB on Linux, bytes on macOS).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _generate(path: Path, n: int, dtype: np.dtype, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tmp = path.with_name(f".{path.name}.tmp")
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n,))
    for start in range(0, n, GEN_CHUNK):
        stop = min(n, start + GEN_CHUNK)
        mm[start:stop] = rng.gamma(2.0, 1.0, stop - start)
    mm.flush()
    del mm
    os.replace(tmp, path)


def _measure_stream(path: str, chunk_size: int) -> dict:
    from ffengine.detect import robust_stats

    arr = np.load(path, mmap_mode="r")
    # Compile (or load from the Numba cache) off the clock, for read-only chunks (memmap)
    # and writable ones (the deviation buffer): Numba types them separately.
    warm = np.ones(5, arr.dtype)
    warm.flags.writeable = False
    robust_stats(warm)
    del arr, warm
    rss_before = _peak_rss_mib()
    t0 = time.perf_counter()
    s = robust_stats(path, chunk_size=chunk_size)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib(), "rss_before_mib": rss_before,
            "passes": s.passes, "median": s.median.item(), "mad": s.mad.item(), "n_nan": s.n_nan}


def _measure_numpy(path: str) -> dict:
    x = np.load(path)
    t0 = time.perf_counter()
    med = np.median(x)
    mad = np.median(np.abs(x - med))
    seconds = time.perf_counter() - t0
    return {"numpy_seconds": seconds, "numpy_peak_rss_mib": _peak_rss_mib(),
            "numpy_median": med.item(), "numpy_mad": mad.item()}


def _in_subprocess(mode: str, path: Path, chunk_size: int) -> dict:
    cmd = [sys.executable, __file__, "--_measure", mode, "--path", str(path),
           "--chunk-size", str(chunk_size)]
    env = dict(os.environ)  # import this checkout's ffengine even when it is not installed
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(n: int, dtype: np.dtype, path: Path | None, chunk_size: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="ffengine-bench-mad-") as tmpdir:
        file = path if path is not None else Path(tmpdir) / f"scores_{n}_{dtype.name}.npy"
        generated = False
        if file.exists():
            arr = np.load(file, mmap_mode="r")
            if arr.shape != (n,) or arr.dtype != dtype:
                sys.exit(f"error: {file} holds {arr.dtype} {arr.shape}, expected {dtype} ({n},); "
                         "pass a new --path or matching --n/--dtype")
            del arr
        else:
            file.parent.mkdir(parents=True, exist_ok=True)
            _generate(file, n, dtype, seed)
            generated = True
        result = {"n": n, "dtype": dtype.name, "path": str(file) if path else None,
                  "generated": generated, "file_mib": file.stat().st_size / 2**20,
                  "chunk_size": chunk_size}
        result.update(_in_subprocess("stream", file, chunk_size))
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if n * 8 < ram / 4:
            result.update(_in_subprocess("numpy", file, chunk_size))
            result["matches_numpy"] = (result["median"] == result["numpy_median"]
                                       and result["mad"] == result["numpy_mad"])
            result["speedup_vs_numpy"] = result["numpy_seconds"] / result["seconds"]
        else:
            result["numpy_seconds"] = None
    import numba

    result["machine"] = {"cpu": platform.processor() or platform.machine(),
                         "cores": os.cpu_count(), "numba_threads": numba.get_num_threads(),
                         "numpy": np.__version__, "numba": numba.__version__}
    return result


def _table(r: dict) -> str:
    rows = [("n", f"{r['n']:,}"), ("dtype", r["dtype"]), ("file", f"{r['file_mib']:.1f} MiB"),
            ("passes", str(r["passes"])), ("streaming seconds", f"{r['seconds']:.3f}"),
            ("streaming peak RSS", f"{r['peak_rss_mib']:.1f} MiB "
                                   f"(after imports: {r['rss_before_mib']:.1f} MiB)")]
    if r.get("numpy_seconds") is not None:
        rows += [("numpy seconds", f"{r['numpy_seconds']:.3f}"),
                 ("numpy peak RSS", f"{r['numpy_peak_rss_mib']:.1f} MiB"),
                 ("speedup vs numpy", f"{r['speedup_vs_numpy']:.2f}x"),
                 ("matches numpy", str(r["matches_numpy"]))]
    else:
        rows.append(("numpy", "skipped (array > 1/4 of RAM)"))
    rows += [("median / MAD", f"{r['median']:.9g} / {r['mad']:.9g}"),
             ("machine", f"{r['machine']['cpu']}, {r['machine']['cores']} cores, "
                         f"{r['machine']['numba_threads']} Numba threads")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=lambda s: int(float(s)), help="number of scores (1e7 ok)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--path", type=Path, help="score file to reuse or create (kept)")
    p.add_argument("--chunk-size", type=int, default=1 << 22)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--_measure", choices=["stream", "numpy"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._measure:
        fn = _measure_stream if a._measure == "stream" else _measure_numpy
        args = (str(a.path), a.chunk_size) if a._measure == "stream" else (str(a.path),)
        print(json.dumps(fn(*args)))
        return
    if a.n is None or a.n < 1:
        p.error("--n must be a positive integer")
    r = run(a.n, np.dtype(a.dtype), a.path, a.chunk_size, a.seed)
    print(json.dumps(r) if a.json else _table(r))


if __name__ == "__main__":
    main()
