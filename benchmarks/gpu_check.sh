#!/usr/bin/env bash
# The GPU check, in one go, on one CUDA GPU (H100/H200 class):
#
#   bash benchmarks/gpu_check.sh                 # every stage, in this order:
#     env         GPU model, driver, torch / CUDA / Triton / transformers / Ray / Liger versions
#     ceiling     benchmarks/step_ceiling.py for both configs: each matmul and the attention of
#                 a step timed alone, the MFU a step cannot exceed with these kernels (12 s on an H200);
#                 then llama-125m's with its projections apart (train.compile=false: as eager runs them)
#     tests       pytest tests/test_perf_options.py -k "gpu or compiled_blocks" (the
#                 compiled blocks' mask and RoPE under the GPU image's transformers; bf16 and
#                 compiled steps, every loss setting incl. liger, the whole main segment on a
#                 GPU Ray Train worker + resume)
#     fuse        benchmarks/compile_time.py: llama-125m's step compiled per block with its q/k/v and
#                 gate/up projections fused (train.compile's) and apart, 20 steps each, a cold compile
#     loss        benchmarks/compile_time.py --part loss: llama-125m's LM head and loss (32,768
#                 tokens, chunks of 4,096, bf16) eager, compiled whole, compiled per chunk
#                 (train.compile's)
#     bench-125m  benchmarks/train_throughput.py, configs/llama-125m.yaml: raypath and the plain
#                 loop x kernel settings chunked, full (loss_chunk_tokens=0), liger; the plain
#                 loop's first run of each setting also profiled (--profile: ms per step by kind)
#     bench-350m  the same for configs/llama-350m.yaml
#   bash benchmarks/gpu_check.sh bench-350m:chunked tests   # only the stages named; a bench
#                                                           # stage takes :settings (--kernels)
#
# Everything it prints is also written under $OUT (default runs/gpu_check): check.log,
# env.txt, ceiling.json, ceiling-apart.json, tests.log, fuse.json, loss_compile.json,
# bench-llama-*.json (the summaries, with the device name).
# Each stage runs under its own timeout, so a stuck stage cannot eat the others' time:
# STAGE_TIMEOUT_S if set, else 120 s for the ceiling, 300 s for the tests, 180 s for the fuse
# and the loss stages (unmeasured; two and three processes that compile), and for a bench
# stage 150 s + 150 s per setting (125m) or 300 s per setting (350m). No stage runs past
# BUDGET_S (default 570) from the start, install included: the device tool stops a call at
# 600 s and what it stops writes nothing more, so the script's own timeout ends the last
# stage first, and a stage with under 20 s left is skipped. BUDGET_S=0: no overall limit.
# Measured on an H200 (2026-12-04): env 7 s; ceiling 12 s; tests 156 s (before the compiled
# loss variants); bench-125m 2.4 min to prepare the run directory and finish the first
# raypath run, then ~2.3 min per setting (each of its two runs starts a process and compiles
# for ~1 min; 15 steps per run, the last 10 measured); bench-350m ~2.6 min per run (~5 min
# per setting). Every stage with every setting takes ~25 min, more than one device lease
# holds: name the stages a lease affords, the headline first. For a 15-min lease (the
# machine's start included): `env bench-125m:chunked tests` in one call (~9 min), then
# `ceiling fuse` in a second if ~4 min remain.
#
# No network on the GPU machine: Ray, Liger and what they need come as wheels in .whl/
# (fetch them beforehand with benchmarks/gpu_wheels.sh and carry .whl/); they are
# installed into /tmp/site. Both configs share one prepared run directory
# (runs/bench-gpu: corpus, 32k tokenizer, token streams): the first benchmark prepares
# it (~1 min); carried along, it is reused.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
PY=${PY:-python3}
STAGES=${*:-env ceiling tests fuse loss bench-125m bench-350m}
BUDGET_S=${BUDGET_S:-570}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/check.log") 2>&1
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_DATA_DISABLE_PROGRESS_BARS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    # A second call on the same (warm) machine finds them installed: ~20 s of device time saved.
    stamp=/tmp/site/.gpu_check-$(ls .whl/*.whl | sha1sum | cut -c1-12)
    mkdir -p /tmp/site
    if [ ! -f "$stamp" ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl && touch "$stamp" || { echo "gpu_check: installing .whl/ failed"; exit 1; }
    fi
    export PYTHONPATH="$PWD:/tmp/site"
fi

limit() {  # $1: a stage's own timeout (s); prints the one it gets: no later than BUDGET_S from the start
    local left=$((BUDGET_S - SECONDS))
    [ "$left" -ge 1 ] || left=1  # timeout 0 would mean none
    if [ "$BUDGET_S" -le 0 ] || [ "$left" -ge "$1" ]; then echo "$1"; else echo "$left"; fi
}

stage_env() {
    {
        date -u +"date %Y-%m-%dT%H:%M:%SZ"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
        "$PY" - <<'PYEOF'
import importlib.metadata, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
for name in ("triton", "transformers", "ray", "liger-kernel", "pyarrow", "tokenizers", "safetensors"):
    try:
        print(name, importlib.metadata.version(name))
    except Exception as e:  # noqa: BLE001 - report, do not stop the check
        print(name, "MISSING:", type(e).__name__, e)
from raypath.perf import device_peak_flops
print("peak FLOP/s used for MFU", device_peak_flops(torch.device("cuda")) if torch.cuda.is_available() else None)
PYEOF
    } | tee "$OUT/env.txt"
}

stage_ceiling() {
    timeout "$(limit "${STAGE_TIMEOUT_S:-120}")" "$PY" benchmarks/step_ceiling.py --device cuda \
        --config configs/llama-125m.yaml --config configs/llama-350m.yaml --out "$OUT/ceiling.json" &&
    timeout "$(limit "${STAGE_TIMEOUT_S:-120}")" "$PY" benchmarks/step_ceiling.py --device cuda \
        --config configs/llama-125m.yaml --set train.compile=false --out "$OUT/ceiling-apart.json"
}

stage_fuse() {
    timeout "$(limit "${STAGE_TIMEOUT_S:-180}")" "$PY" benchmarks/compile_time.py --device cuda --steps 20 \
        --config configs/llama-125m.yaml --modes blocks,unfused --caches cold --out "$OUT/fuse.json"
}

stage_tests() {
    timeout "$(limit "${STAGE_TIMEOUT_S:-300}")" "$PY" -m pytest -q -rap tests/test_perf_options.py -k "gpu or compiled_blocks" 2>&1 | tee "$OUT/tests.log"
}

stage_loss() {
    timeout "$(limit "${STAGE_TIMEOUT_S:-180}")" "$PY" benchmarks/compile_time.py --part loss --device cuda --steps 10 \
        --config configs/llama-125m.yaml --out "$OUT/loss_compile.json"
}

stage_bench() {  # $1: config stem, $2: kernel settings (empty: every one)
    local n per=150
    n=$(echo "${2:-chunked,full,liger}" | tr ',' '\n' | wc -l)
    [ "$1" = llama-125m ] || per=300
    timeout "$(limit "${STAGE_TIMEOUT_S:-$((150 + n * per))}")" "$PY" benchmarks/train_throughput.py --device cuda \
        --config "configs/$1.yaml" ${2:+--kernels "$2"} --repeats 1 --steps 15 --profile 5 \
        --set train.log_every=5 --set run_dir=runs/bench-gpu --out "$OUT/bench-$1${2:+-${2//,/-}}.json"
}

status=0
for stage in $STAGES; do
    echo "=== gpu_check: $stage ($(date -u +%H:%M:%S))"
    if [ "$BUDGET_S" -gt 0 ] && [ $((BUDGET_S - SECONDS)) -lt 20 ]; then
        echo "=== gpu_check: $stage SKIPPED: $((BUDGET_S - SECONDS)) s left of BUDGET_S=$BUDGET_S"
        status=124
        continue
    fi
    case "$stage" in
        env) stage_env ;;
        ceiling) stage_ceiling ;;
        tests) stage_tests ;;
        fuse) stage_fuse ;;
        loss) stage_loss ;;
        bench-*:*) name=${stage%%:*}; stage_bench "llama-${name#bench-}" "${stage#*:}" ;;
        bench-*) stage_bench "llama-${stage#bench-}" ;;
        *) echo "unknown stage $stage (env, ceiling, tests, fuse, loss, bench-125m, bench-350m, bench-NAME:SETTINGS)"; false ;;
    esac
    rc=$?
    [ $rc -eq 124 ] && echo "=== gpu_check: $stage TIMED OUT"
    [ $rc -ne 0 ] && status=$rc
    echo "=== gpu_check: $stage exit $rc ($(date -u +%H:%M:%S))"
done
exit $status
