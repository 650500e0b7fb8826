#!/usr/bin/env bash
# The GPU checks of issue 4 in one call, for a session lent a GPU machine (the device tool:
# `run` with command "bash bench/gpu_session.sh", timeout_s 600). Everything it measures lands
# in $OUT: the card, the install log, the GPU kernel tests, the kernel benchmark and the
# engine throughput table (bench/README.md says how to read them). The machine has PyTorch,
# Triton, numba, scipy, pybind11 and pytest-benchmark; nothing is fetched.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-session-out}
mkdir -p "$OUT"
step() { echo "== $1 ($(date +%T))" | tee -a "$OUT/steps.log"; }

step card
nvidia-smi > "$OUT/card.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__,
torch.cuda.get_device_name())" >> "$OUT/card.txt" 2>&1

step install  # pure Python: the C++ CPU op is not what this machine is for; nothing fetched
FFENGINE_SKIP_EXT=1 python3 -m pip install -q --no-deps --no-build-isolation -e . \
    > "$OUT/install.log" 2>&1 || echo "install failed: see install.log" | tee -a "$OUT/steps.log"

step build-cuda  # csrc/ghost_score_cuda.cu through torch's JIT build, into its extension cache
timeout 170 python3 -c "from ffengine.ops import cuda_ext; import sys;
m = cuda_ext.load(); print('built' if m else cuda_ext.unavailable_reason()); sys.exit(m is None)" \
    > "$OUT/build_cuda.log" 2>&1
tail -n 2 "$OUT/build_cuda.log" | tee -a "$OUT/steps.log"

step tests  # Triton and CUDA kernels on the GPU against the reference (no interpreter)
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py \
    tests/test_cuda_kernel.py tests/test_ghost_score.py > "$OUT/tests.log" 2>&1
tail -n 3 "$OUT/tests.log" | tee -a "$OUT/steps.log"

step kernel-bench
timeout 90 python3 -m pytest -q -p no:cacheprovider bench/bench_ghost_score.py \
    --benchmark-json "$OUT/ghost_score.json" --benchmark-group-by=param:d_out,param:K \
    --benchmark-columns=median,iqr,rounds > "$OUT/ghost_score.log" 2>&1
tail -n 3 "$OUT/ghost_score.log" | tee -a "$OUT/steps.log"

step throughput  # plain inference vs the engine per backend, the reference, vmap; peaks
timeout 170 python3 bench/throughput.py --device cuda --models small,resnet18 \
    --n 5000,50000 --n-resnet18 5000 --json > "$OUT/throughput.json" 2> "$OUT/throughput.log"
tail -n 12 "$OUT/throughput.log" | tee -a "$OUT/steps.log"
step done
