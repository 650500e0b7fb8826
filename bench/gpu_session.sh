#!/usr/bin/env bash
# The GPU checks of issue 4 in one call, for a session lent a GPU machine (the device tool:
# `run` with command "bash bench/gpu_session.sh", carry [".gpu"], timeout_s 600). Steps run in
# order of importance, each capped by the time left of GPU_SESSION_BUDGET_S, so a slow step
# costs the later ones, never the results already written:
#   1. card and versions; install (pure Python: the C++ CPU op is not what this machine is for)
#   2. where an engine pass spends its time (bench/engine_profile.py), before anything else
#      loads the host's cores
#   3. the Triton kernels' GPU tests, while the CUDA kernels build in the background
#   4. the CUDA kernels' tests, the engine on cuda against the CPU (tests/test_cuda_engine.py)
#   5. the demo traced on the GPU with every GPU backend, compared with the CPU's trace of it
#      (.gpu/, made here by bench/prepare_gpu_session.sh: the instances and that trace)
#   6. the kernel benchmark; 7. the throughput table (bench/throughput.py)
# What it measures lands in $OUT in at most 8 files (the device tool returns no more):
# setup.log, tests.log, demo.log, demo_backends.json, profile.txt, ghost_score.json,
# throughput.{json,log}. The machine has PyTorch, Triton, numba, scipy, pybind11 and
# pytest-benchmark; nothing is fetched. THROUGHPUT_ARGS overrides the throughput grid.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-session-out}
mkdir -p "$OUT"
BUDGET=${GPU_SESSION_BUDGET_S:-570}
# the demo's model only: with the other steps, more does not fit one call (2026-12-04: the
# steps before it took 296 s). n = 100,000: the setup writes it in about 30 s; each engine
# measurement reports how long it waited for its first chunk (start-up) and for all of them.
# A second call: STEPS=throughput THROUGHPUT_ARGS="--models resnet18 --n-resnet18 20000"
THROUGHPUT_ARGS=${THROUGHPUT_ARGS:---models small --n 100000}
WORKERS=${WORKERS:-12}  # decoding processes: the engine's default on a GPU (16-core hosts)
# DEVICE=cpu SKIP_INSTALL=1 DEMO_TRACE_ARGS="--draws 1": a dry run of the flow on a CPU
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-all}  # or some of: profile,tests,demo,kernel-bench,throughput
LOG="$OUT/setup.log"
want() { [ "$STEPS" = all ] || [[ ",$STEPS," == *",$1,"* ]]; }
step() { echo "== $1 ($(date +%T), ${SECONDS}s)" | tee -a "$LOG"; }
# seconds a step may take: at most $1, and never past the budget (0: skip the step)
cap() { local left=$((BUDGET - SECONDS)); ((left > $1)) && left=$1; ((left < 15)) && left=0
        echo "$left"; }
run_capped() {  # run_capped MAX_S LOGFILE COMMAND...: the command under timeout, or skipped
    local t; t=$(cap "$1"); local log=$2; shift 2
    if ((t == 0)); then echo "   skipped: out of time" | tee -a "$LOG"; return 1; fi
    timeout "$t" "$@" >> "$log" 2>&1; local rc=$?
    ((rc == 124)) && echo "   stopped at its ${t} s limit" | tee -a "$LOG"
    return $rc
}

step card
{ nvidia-smi; python3 -c "import torch, triton, numpy; print('torch', torch.__version__,
'triton', triton.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name(),
'capability', torch.cuda.get_device_capability())"; nproc; } >> "$LOG" 2>&1
ARCH=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" \
       2>/dev/null)
export TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=12  # the CUDA build: this card only

step install
[ -n "${SKIP_INSTALL:-}" ] || FFENGINE_SKIP_EXT=1 python3 -m pip install -q --no-deps \
    --no-build-isolation -e . >> "$LOG" 2>&1 || echo "install failed: see above" | tee -a "$LOG"

if want profile; then
    step profile  # where an engine pass's time goes per operator, device and host
    for b in torch triton; do
        run_capped 90 "$OUT/profile.txt" python3 bench/engine_profile.py --device "$DEVICE" \
            --n 32768 --backend "$b" --workers "$WORKERS"
    done
    grep " s \|^==.*engine_profile" "$OUT/profile.txt" | tee -a "$LOG"
fi

# csrc/ghost_score_cuda.cu through torch's JIT build, beside the Triton tests (a throughput
# run whose backends name cuda builds it in its first cuda measurement, before the timer)
BUILD_PID=
if want tests || want demo; then
    step build-cuda-in-background
    BUILD_LOG=$(mktemp)
    ( timeout 240 python3 -c "from ffengine.ops import cuda_ext; import sys;
m = cuda_ext.load(); print('built' if m else cuda_ext.unavailable_reason()); sys.exit(m is None)"
      echo "build rc=$?" ) > "$BUILD_LOG" 2>&1 &
    BUILD_PID=$!
fi

if want tests; then
    step tests-triton  # the Triton kernels compiled on the GPU against the float64 reference
    run_capped 200 "$OUT/tests.log" python3 -m pytest -q -p no:cacheprovider -m gpu -rs \
        tests/test_triton_kernel.py
    tail -n 1 "$OUT/tests.log" | tee -a "$LOG"
fi

if [ -n "$BUILD_PID" ]; then
    step wait-build
    wait "$BUILD_PID"; tail -n 3 "$BUILD_LOG" | tee -a "$LOG"
fi

if want tests; then
    step tests-cuda-and-engine
    run_capped 150 "$OUT/tests.log" python3 -m pytest -q -p no:cacheprovider -rs \
        tests/test_cuda_kernel.py tests/test_cuda_engine.py tests/test_ghost_score.py
    tail -n 1 "$OUT/tests.log" | tee -a "$LOG"
fi

DEMO=$(mktemp -d)
if ! want demo; then
    :
elif [ -d .gpu/cpu-trace ]; then
    step demo-backends  # the bundled demo, traced per GPU backend, against the CPU's trace
    run_capped 90 "$OUT/demo.log" ffengine poison -o "$DEMO/data" --attack pe2 \
        --poison-rate 0.1 --quiet --json
    # float32 on each backend, then bf16 autocast (how far it moves the flagged set)
    for b in torch triton cuda triton:bfloat16; do
        backend=${b%%:*}; precision=float32; [ "$b" = "$backend" ] || precision=${b#*:}
        name=$backend; [ "$precision" = float32 ] || name=$backend-$precision
        echo "-- trace $name ($(date +%T))" >> "$OUT/demo.log"
        # shellcheck disable=SC2086  # DEMO_TRACE_ARGS is a list of arguments
        run_capped 90 "$OUT/demo.log" ffengine trace --run ffengine/assets/demo-runs/pe2-10 \
            --index "$DEMO/data/index" --instance .gpu/instances/* -o "$DEMO/trace-$name" \
            --backend "$backend" --precision "$precision" --device "$DEVICE" --compile off \
            --workers "$WORKERS" --quiet --json ${DEMO_TRACE_ARGS:-}
        run_capped 30 "$OUT/demo.log" ffengine eval --truth "$DEMO/data/truth.json" \
            "$DEMO/trace-$name" --json
    done
    python3 bench/compare_traces.py .gpu/cpu-trace "$DEMO"/trace-* --json \
        > "$OUT/demo_backends.json" 2>> "$OUT/demo.log"
    tail -n 4 "$OUT/demo.log" | tee -a "$LOG"
else
    echo "   no .gpu/cpu-trace: run bench/prepare_gpu_session.sh first" | tee -a "$LOG"
fi


if want kernel-bench; then
    step kernel-bench  # its table goes to setup.log (8 files at most come back)
    run_capped 60 "$LOG" python3 -m pytest -q -p no:cacheprovider \
        bench/bench_ghost_score.py --benchmark-json "$OUT/ghost_score.json" \
        --benchmark-group-by=param:d_out,param:K --benchmark-columns=median,iqr,rounds
fi

if want throughput; then
    step throughput  # plain inference vs the engine per backend, the reference, vmap; peaks
    # shellcheck disable=SC2086  # THROUGHPUT_ARGS is a list of arguments
    run_capped 400 "$OUT/throughput.log" python3 bench/throughput.py --device "$DEVICE" \
        --workers "$WORKERS" --out "$OUT/throughput.json" $THROUGHPUT_ARGS
    tail -n 30 "$OUT/throughput.log" | tee -a "$LOG"
fi
step done
