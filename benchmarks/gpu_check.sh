#!/usr/bin/env bash
# The GPU check: CUDA tests, `ccalign reproduce` on tiny releases, CCA train-step and sampling
# benchmarks for GPT-B and GPT-L (eager, CUDA graph, compile) and the T2I XL, the GPT-3B memory
# plan and a real 3B CCA step (random weights, bf16 weights, activation checkpointing); one JSON
# and one markdown table in OUT.
#
#   bash benchmarks/gpu_check.sh OUT               # a CUDA machine: <= 8 minutes on one H200
#   bash benchmarks/gpu_check.sh --cpu-smoke OUT   # every stage with tiny sizes on the CPU
#
# With checkouts of the official code, it also runs benchmarks/side_by_side.py (GPT-B and
# VAR-d16 against FoundationVision/LlamaGen and FoundationVision/VAR, same weights):
#   OFFICIAL_LLAMAGEN=~/LlamaGen OFFICIAL_VAR=~/VAR bash benchmarks/gpu_check.sh OUT
#
# Uses the machine's own python3 (PYTHON=... to choose another) with PYTHONPATH=src: nothing is
# installed. Output is printed as it comes (PYTHONUNBUFFERED, no pipes); every stage has its own
# time limit, cut to what is left of the whole budget (BUDGET_S, default 450 s), so one hang
# cannot eat the rest. OUT/stages.tsv records each stage's exit code and time.
set -u
cd "$(dirname "$0")/.."

SMOKE=0
if [ "${1:-}" = "--cpu-smoke" ]; then
    SMOKE=1
    shift
fi
OUT=${1:?usage: bash benchmarks/gpu_check.sh [--cpu-smoke] OUT_FOLDER}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-450}
REPORT_S=30 # kept for the report at the end
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STARTED=$(date +%s)
: >"$OUT/stages.tsv"

stage() { # stage NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - REPORT_S - ($(date +%s) - STARTED)))
    if [ "$left" -lt 10 ]; then
        echo "=== [$name] skipped: the time budget is spent"
        printf '%s\t%s\t%s\t%s\n' "$name" "-1" "0" "skipped (budget)" >>"$OUT/stages.tsv"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== [$name] (limit ${limit}s) $*"
    local t0
    t0=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    local ms=$((($(date +%s%N) - t0) / 1000000))
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$ms" "$*" >>"$OUT/stages.tsv"
    echo "=== [$name] exit $rc after $((ms / 1000)) s"
}

if [ "$SMOKE" = 1 ]; then
    DEV=cpu
    TINY_TRAIN=(--model custom --grid 4 --dim 64 --layers 2 --heads 4 --vocab 512 --micro-batch 4
        --steps 1 --threads 1)
    TRAIN_B=("${TINY_TRAIN[@]}")
    TRAIN_L=("${TINY_TRAIN[@]}")
    TRAIN_L32=("${TINY_TRAIN[@]}")
    TRAIN_3B=("${TINY_TRAIN[@]}")
    SAMPLE_B=(--model custom --grid 4 --threads 1)
    SAMPLE_L=("${SAMPLE_B[@]}")
    SAMPLE_T2I=("${SAMPLE_B[@]}")
    JANUS=(--batch-sizes 1 --repeats 1 --threads 1)
    B_BATCHES=8 L_BATCHES=4,8 L_BIG=8
    MODES_GRAPH=eager # no CUDA graph on the CPU
    MODES_COMPILE=eager # torch.compile costs minutes on small CPUs: the smoke run skips it
else
    DEV=cuda
    TRAIN_B=(--model GPT-B --grid 24 --micro-batch 8 --steps 5)
    TRAIN_L=(--model GPT-L --grid 24 --micro-batch 8 --steps 5)
    TRAIN_L32=(--model GPT-L --grid 24 --micro-batch 32 --steps 3)
    TRAIN_3B=(--model GPT-3B --grid 24 --micro-batch 8 --steps 2)
    SAMPLE_B=(--model GPT-B --grid 24)
    SAMPLE_L=(--model GPT-L --grid 24)
    SAMPLE_T2I=(--model GPT-XL --grid 16)  # LlamaGen's T2I XL at 256 px
    JANUS=(--preset Janus-Pro-1B --batch-sizes 1,16 --repeats 2)  # random weights, 576 tokens
    B_BATCHES=256 L_BATCHES=8,256 L_BIG=256
    MODES_GRAPH=graph
    MODES_COMPILE=compile
fi

stage env 30 "$PY" - "$OUT/env.json" "$DEV" <<'EOF'
import json, platform, sys
import torch
out, dev = sys.argv[1], sys.argv[2]
if dev == "cuda":
    if not torch.cuda.is_available():
        sys.exit("no CUDA device is visible: run with --cpu-smoke on a machine without a GPU")
    p = torch.cuda.get_device_properties(0)
    machine = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"
else:
    machine = f"{platform.machine()} CPU (smoke run: tiny sizes), torch {torch.__version__}"
print(machine)
json.dump({"machine": machine, "device": dev, "python": sys.version.split()[0]}, open(out, "w"))
EOF
stage cuda_tests 150 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider \
    --junitxml "$OUT/cuda_tests.xml"
# ccalign reproduce end to end on tiny random releases, with each family's protocol dtypes on
# CUDA (bf16 weights for LlamaGen, float16 autocast over float32 weights for VAR)
stage reproduce_tiny 90 "$PY" -m pytest -q -m cuda tests/commands/test_reproduce.py \
    -p no:cacheprovider --junitxml "$OUT/reproduce_tiny.xml"
stage train_GPT-L_mb8 90 "$PY" benchmarks/train_step.py "${TRAIN_L[@]}" --device $DEV \
    --json "$OUT/train_GPT-L_mb8.json"
stage sample_GPT-L_eager 90 "$PY" benchmarks/sample.py "${SAMPLE_L[@]}" --device $DEV \
    --batch-sizes $L_BIG --modes eager --repeats 1 --json "$OUT/sample_GPT-L_eager.json"
stage sample_GPT-L_graph 60 "$PY" benchmarks/sample.py "${SAMPLE_L[@]}" --device $DEV \
    --batch-sizes $L_BATCHES --modes $MODES_GRAPH --repeats 1 \
    --json "$OUT/sample_GPT-L_graph.json"
stage plan_GPT-3B 30 "$PY" -m ccalign.cli finetune --config configs/llamagen_3B.toml --dry-run \
    --gpu-memory 80GiB --set 'train.device="cuda"' --set 'train.weights_dtype="bf16"' \
    --set train.activation_checkpointing=true --set train.micro_batch=8
stage train_GPT-3B_bf16 150 "$PY" benchmarks/train_step.py "${TRAIN_3B[@]}" --device $DEV \
    --weights-dtype bf16 --activation-checkpointing --variants ccalign \
    --json "$OUT/train_GPT-3B_bf16.json"
stage train_GPT-L_mb8_bf16_ac 60 "$PY" benchmarks/train_step.py "${TRAIN_L[@]}" --device $DEV \
    --weights-dtype bf16 --activation-checkpointing --variants ccalign \
    --json "$OUT/train_GPT-L_mb8_bf16_ac.json"
stage train_GPT-B_mb8 60 "$PY" benchmarks/train_step.py "${TRAIN_B[@]}" --device $DEV \
    --json "$OUT/train_GPT-B_mb8.json"
stage train_GPT-L_mb32_ac 60 "$PY" benchmarks/train_step.py "${TRAIN_L32[@]}" --device $DEV \
    --activation-checkpointing --variants ccalign --json "$OUT/train_GPT-L_mb32_ac.json"
stage sample_GPT-B_eager_graph 60 "$PY" benchmarks/sample.py "${SAMPLE_B[@]}" --device $DEV \
    --batch-sizes $B_BATCHES --modes "eager,$MODES_GRAPH" --repeats 1 \
    --json "$OUT/sample_GPT-B_eager_graph.json"
stage sample_T2I_graph 90 "$PY" benchmarks/sample.py --t2i "${SAMPLE_T2I[@]}" --device $DEV \
    --batch-sizes 8,64 --modes $MODES_GRAPH --repeats 1 --json "$OUT/sample_T2I_graph.json"
stage sample_janus 150 "$PY" benchmarks/janus_sampling.py "${JANUS[@]}" --device $DEV \
    --out "$OUT/sample_janus.json"  # needs transformers on the machine
stage sample_GPT-L_compile 150 "$PY" benchmarks/sample.py "${SAMPLE_L[@]}" --device $DEV \
    --batch-sizes $L_BIG --modes $MODES_COMPILE --repeats 1 \
    --json "$OUT/sample_GPT-L_compile.json"

SIDE_BY_SIDE=()
[ -n "${OFFICIAL_LLAMAGEN:-}" ] && SIDE_BY_SIDE+=(--official-llamagen "$OFFICIAL_LLAMAGEN")
[ -n "${OFFICIAL_VAR:-}" ] && SIDE_BY_SIDE+=(--official-var "$OFFICIAL_VAR")
if [ "${#SIDE_BY_SIDE[@]}" -gt 0 ]; then
    if [ "$SMOKE" = 1 ]; then # the real sizes on the CPU: one small row of each kind
        SIDE_BY_SIDE+=(--batch-sizes 1 --rounds 1 --train-batch 2)
    else
        SIDE_BY_SIDE+=(--batch-sizes 1,8,64 --rounds 3 --train-batch 8)
    fi
    stage side_by_side 240 "$PY" benchmarks/side_by_side.py "${SIDE_BY_SIDE[@]}" --device $DEV \
        --json "$OUT/side_by_side.json"
fi

REPORT_S=0 stage report 30 "$PY" benchmarks/gpu_report.py "$OUT"
echo "done in $(($(date +%s) - STARTED)) s: $OUT/gpu_check.json and $OUT/gpu_check.md"
