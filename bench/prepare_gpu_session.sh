#!/usr/bin/env bash
# Before a GPU session (bench/gpu_session.sh): trace the bundled demo here on the CPU and put
# what the GPU machine needs to compare with it in .gpu/ (gitignored; the device tool's
# `carry`): the demo's backdoor instances and the CPU trace's scores and flagged ids. The
# poisoned data itself is remade there (seeded; the trace checks its hash against the run).
#   bash bench/prepare_gpu_session.sh [DEMO_WORKDIR]   # default ffengine-demo; ~4 min
set -euo pipefail
WORK=${1:-ffengine-demo}
[ -d "$WORK/pe2-r10/instances" ] || ffengine demo --workdir "$WORK" --quiet
TRACE=$(ls -d "$WORK"/pe2-r10/trace-*/ | head -n 1)
rm -rf .gpu && mkdir -p .gpu/cpu-trace
cp -r "$WORK/pe2-r10/instances" .gpu/instances
for f in summary.json metadata.json scores.npy detection_scores.npy flagged.npy; do
    cp "$TRACE/$f" .gpu/cpu-trace/
done
du -sh .gpu
