#!/usr/bin/env bash
# Issue 15's runs on a machine with 2 GPUs, in one device call (kind nvidia-h200-x2, carry [".whl"]):
#
#   bash bench/two_gpu.sh            # writes $OUT/two_gpu.log (and $OUT/*.json)
#
# 1. `outlierlab profile` of the 7B-shaped synthetic model in bf16 on 16 windows x 2048 tokens: one GPU, then
#    torchrun on two (NCCL, NVLink multicast off); the merged report.json is compared with the 1-GPU one
#    (bench/compare_profiles.py) and the wall times are put side by side (target: 2 GPUs / 1 GPU <= 0.55).
# 2. `outlierlab run --quick` of the 13B-shaped synthetic model sharded over both GPUs by --max-memory (each
#    GPU is given less than the model, so accelerate must split it): per-stage seconds (stages.json) and the
#    peak memory of each GPU (nvidia-smi, sampled every 0.5 s).
#
# The same flow on a CPU (gloo, a small model, no sharding), to check the script itself:
#   DEVICE=cpu DTYPE=float32 MODEL=synthetic:llama-tiny N=8 SEQ=128 RUN_MODEL=synthetic:llama-tiny MAXMEM= \
#       OUT=/tmp/t2 PYTHON=.venv/bin/python bash bench/two_gpu.sh
set -uo pipefail
OUT=${OUT:-/tmp/two_gpu_out}
DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bfloat16} MODEL=${MODEL:-synthetic:llama-7b} N=${N:-16} SEQ=${SEQ:-2048}
RUN_MODEL=${RUN_MODEL:-synthetic:llama-13b} MAXMEM=${MAXMEM-0=16GiB,1=16GiB,cpu=100GiB} PY=${PYTHON:-python3}
W=/tmp/two_gpu_work
rm -rf "$W" && mkdir -p "$OUT" "$W"
LOG=$OUT/two_gpu.log
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
fi
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
printf 'import sys\nfrom outlierlab.cli import app\nsys.argv[0] = "outlierlab"\napp()\n' > "$W/cli.py"
ARGS=(--model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" -n "$N" --seq-len "$SEQ" --no-progress)
{
  nvidia-smi --query-gpu=index,name,memory.total --format=csv 2>/dev/null
  echo "== 1 device: profile $MODEL, $N x $SEQ"
  t0=$(date +%s.%N)
  CUDA_VISIBLE_DEVICES=0 $PY "$W/cli.py" profile "${ARGS[@]}" --out "$W/one" || echo "1-device profile failed: $?"
  t1=$(date +%s.%N)
  echo "== 2 ranks: torchrun, the same windows (half per rank)"
  $PY -m torch.distributed.run --nproc-per-node 2 "$W/cli.py" profile "${ARGS[@]}" --out "$W/two" \
      || echo "2-rank profile failed: $?"
  t2=$(date +%s.%N)
  $PY bench/two_gpu_summary.py times "$W" "$t0" "$t1" "$t2"
  $PY bench/compare_profiles.py "$W/one" "$W/two"
  cp "$W/one/report.json" "$OUT/one_report.json" 2>/dev/null
  echo "== $RUN_MODEL over both GPUs (--max-memory ${MAXMEM:-none}): run --quick"
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$W/mem.csv" 2>/dev/null &
  SMI=$!
  $PY "$W/cli.py" run --quick --model "$RUN_MODEL" --device "$DEVICE" --dtype "$DTYPE" \
      ${MAXMEM:+--max-memory "$MAXMEM"} --out "$W/run" --no-progress || echo "sharded run failed: $?"
  kill $SMI 2>/dev/null
  $PY bench/two_gpu_summary.py run "$W"
  cp "$W/run/stages.json" "$OUT/run_stages.json" 2>/dev/null
} > "$LOG" 2>&1
tail -20 "$LOG"
