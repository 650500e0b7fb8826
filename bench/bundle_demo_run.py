"""Copy a finished pre-training run into the package as a bundled demo run.

    python bench/bundle_demo_run.py RUN_DIR ffengine/assets/demo-runs/pe2-10 \
        --command "ffengine pretrain --index DATA/index -o RUN --model small --epochs 75"

The weights of every checkpoint and the manifest are copied; the Adam state is left out (it
triples the size and the demo does not need it), and the manifest says so. The run must have
been trained on the index that ``ffengine poison`` writes for the demo's attack settings:
the demo checks the hash before it uses the run.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ffengine.io_utils import atomic_write_json


def bundle(src: Path, dst: Path, command: str | None) -> None:
    manifest = json.loads((src / "manifest.json").read_text())
    dst.mkdir(parents=True, exist_ok=True)
    for c in manifest["checkpoints"]:
        shutil.copyfile(src / c["weights"], dst / c["weights"])
        c.pop("optimizer", None)
    manifest["bundled"] = {
        "from": str(src),
        "optimizer_state": "left out of the bundled copy (re-create the run to have it)",
    }
    if command:
        manifest["bundled"]["original_command"] = manifest.get("command")
        manifest["command"] = command
    atomic_write_json(dst / "manifest.json", manifest)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--command", help="the CLI command that re-creates the run")
    a = p.parse_args()
    bundle(a.src, a.dst, a.command)
