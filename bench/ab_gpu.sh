#!/usr/bin/env bash
# The GPU checks of a change to the statistics kernels, each part fitting one device call (carry [".whl"];
# pytest-xdist and execnet wheels in .whl let the lane run on 6 workers: `pip download --no-deps -d .whl
# pytest-xdist execnet`):
#
#   bash bench/ab_gpu.sh lane                 # the CUDA lane on this tree (tests/test_lane.py + test_stats_triton.py)
#   OLD=old_src/src bash bench/ab_gpu.sh ab   # this tree's src against OLD: kernels per update, whole profiles
#   bash bench/ab_gpu.sh final                # the lane, device_consistency and the 7B ratios at batch 4, 1, 16
#                                             # (issue 11's acceptance rows), one call of ~400 s with 6 workers
#   OLD=old_src/src bash bench/ab_gpu.sh decide  # a pending change: this tree against OLD at batch 4, 1, 16,
#                                             # ROUNDS=2 rounds interleaved (each profile's phases), then
#                                             # device_consistency (~500 s; the lane is a call of its own)
#   bash bench/ab_gpu.sh overlap              # the 7B ratios with the side-stream overlap (tracing/overlap.py)
#                                             # and without (--no-overlap), ROUNDS=1 round of ~300 s
#   bash bench/ab_gpu.sh priority             # the passes on a high-priority CUDA stream against the default
#                                             # one (session 15: no gain), then one profile's breakdown (~240 s)
#   bash bench/ab_gpu.sh tune                 # whole profiles under stats_pass geometries (kernels.TUNE,
#                                             # VARIANTS='{};{"group": 1024}'), ROUNDS=2 rounds (~270 s)
#   bash bench/ab_gpu.sh positions            # what each group of positions costs the 7B profile: whole
#                                             # profiles with DROPS (;-separated lists of positions left
#                                             # untraced) at BATCHES=4, ROUNDS=2 rounds interleaved (~350 s)
#   OLD=old_src/src bash bench/ab_gpu.sh first  # the default model's first profile (2 x 128 and 16 x 512) with an
#                                             # empty Triton cache (a fresh machine's compile) and again with the
#                                             # cache it left, this tree and OLD (optional), then the steady state of
#                                             # eager (compile never) and graphed statistics on it (~400 s; needs
#                                             # /tmp/m/a from the first call of ../shared/gpu/README.md and carry
#                                             # [".gguf-parts/b", ".whl"])
#   bash bench/ab_gpu.sh graph                # bench/forward_graph.py on the 7B shape: can the traced forward be
#                                             # one CUDA graph, and what would it save at batch 1 and 4
#   bash bench/ab_gpu.sh timeline             # the 7B profile's phases and device timeline (model kernels,
#                                             # statistics kernels, copies, idle) at batch 4 and 1, the ops of
#                                             # one results() (in timeline.log), and the kernels' geometry
#                                             # sweep at batch 4 (~150 s)
#
# OLD is a src folder of the code to compare with, inside the repository so that it travels (untracked, not
# ignored), e.g. `mkdir old_src && git archive main src | tar -x -C old_src`. Logs go to $OUT (ab.log, lane.log).
set -uo pipefail
PART=${1:-ab}
OUT=${OUT:-/tmp/ab_out}
# the profile / bare forward benchmark on the 7B shape, which every part below runs with its own windows
P=(python3 bench/profile_overhead.py --synthetic 7b --device cuda --dtype bfloat16 --seq-len 2048)
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "$PART" = graph ]; then
  PYTHONPATH=/tmp/site:$PWD/src timeout "${GRAPH_TIMEOUT:-300}" python3 bench/forward_graph.py --synthetic 7b \
      --batch-sizes 1,4 2>&1 | tee "$OUT/graph.log" | grep -E "^model|^batch"
  exit 0
fi
if [ "$PART" = overlap ]; then
  # on / off: 16 forwards at batch 1 and at batch 4 (64 windows), and the acceptance shape at batch 4 and 16
  # (4 and 1 forwards) with the watch forced (--overlap-min-forwards 1); ~300 s a round
  export PYTHONPATH=/tmp/site:$PWD/src
  for i in $(seq "${ROUNDS:-1}"); do
    for flag in "" --no-overlap; do
      echo "=== overlap ${flag:-on}, round $i"
      timeout 100 "${P[@]}" --n-samples 16 --batch-sizes 1 --repeats 3 $flag 2>&1 | tee -a "$OUT/overlap.log" \
          | grep -E "ratio|memory"
      timeout 120 "${P[@]}" --n-samples 64 --batch-sizes 4 --repeats 2 $flag 2>&1 | tee -a "$OUT/overlap.log" \
          | grep -E "ratio|memory"
      timeout 100 "${P[@]}" --n-samples 16 --batch-sizes 4,16 --repeats 3 --overlap-min-forwards 1 $flag 2>&1 \
          | tee -a "$OUT/overlap.log" | grep -E "ratio|memory"
    done
  done
  exit 0
fi
if [ "$PART" = priority ]; then
  # the passes on a CUDA stream of priority -1 (above the statistics' side stream) against the default stream,
  # the acceptance shape at batch 4 and 1, ROUNDS=2 rounds interleaved, then one profile's phases and host time
  export PYTHONPATH=/tmp/site:$PWD/src
  for i in $(seq "${ROUNDS:-2}"); do
    for prio in -1 ""; do
      echo "=== model stream priority ${prio:-default}, round $i"
      timeout 100 "${P[@]}" --n-samples 16 --batch-sizes 4,1 --repeats 3 ${prio:+--model-stream-priority $prio} \
          2>&1 | tee -a "$OUT/priority.log" | grep -E "ratio|priority"
    done
  done
  timeout 100 "${P[@]}" --n-samples 16 --batch-sizes 4 --repeats 1 --breakdown > "$OUT/breakdown.log" 2>&1
  grep -E "one profile" "$OUT/breakdown.log"
  exit 0
fi
if [ "$PART" = tune ]; then
  # stats_pass geometry in whole profiles (overlap on): the default (256 programs at 4 x 2048 x 4096) against
  # fewer, longer ones beside the model's kernels (group 1024: 128; with 512 channels per block: 64); VARIANTS
  # (JSON dicts separated by ;) and ROUNDS=2 rounds interleaved. Longer groups hold a group's token maxima
  # in registers (_fold_tokens): keep group <= 1024
  export PYTHONPATH=/tmp/site:$PWD/src
  DEFAULT_VARIANTS='{};{"group": 1024};{"group": 1024, "bc": 512}'
  IFS=';' read -r -a VS <<< "${VARIANTS:-$DEFAULT_VARIANTS}"
  for i in $(seq "${ROUNDS:-2}"); do
    for v in "${VS[@]}"; do
      echo "=== tune $v, round $i"
      timeout 100 "${P[@]}" --n-samples 16 --batch-sizes 4,1 --repeats 3 --tune "$v" 2>&1 | tee -a "$OUT/tune.log" \
          | grep -E "ratio"
    done
  done
  exit 0
fi
if [ "$PART" = first ]; then
  [ -f /tmp/m/model.gguf ] || cat /tmp/m/a .gguf-parts/b > /tmp/m/model.gguf
  CLI=(python3 -c 'import sys; from outlierlab.cli import app; sys.argv[0] = "outlierlab"; app()')
  for v in src ${OLD:-}; do
    for shape in "-n 2 --seq-len 128" "-n 16 --seq-len 512"; do
      cache=$(mktemp -d)
      for run in "empty cache" "cache of the run before"; do
        echo "=== $v, $shape, $run" | tee -a "$OUT/first.log"
        TRITON_CACHE_DIR=$cache PYTHONPATH=/tmp/site:$PWD/$v timeout 120 "${CLI[@]}" profile --device cuda \
            --model /tmp/m/model.gguf $shape --out /tmp/first --no-progress 2>&1 | tee -a "$OUT/first.log" \
            | grep -E "traced in|wrote|Error"
        python3 -c "import json; print(json.load(open('/tmp/first/report.json'))['config']['stats']['compile'])"
      done
    done
  done
  for mode in never graphs; do
    echo "=== steady state, compile $mode" | tee -a "$OUT/first.log"
    for shape in "-n 4 --seq-len 128" "-n 16 --seq-len 512"; do
      PYTHONPATH=/tmp/site:$PWD/src timeout 120 python3 bench/profile_overhead.py --model /tmp/m/model.gguf \
          --device cuda --dtype float32 ${shape/-n/--n-samples} --batch-sizes 4 --repeats 3 --compile $mode 2>&1 \
          | tee -a "$OUT/first.log" | grep -E "ratio|phases"
    done
  done
  exit 0
fi
if [ "$PART" = positions ]; then
  # the first variant traces every position; the second leaves out the two tensors a GLU pass computing act and
  # act * up from gate and up would not read (its upper bound), the third every FFN-wide one, the last q/k/v
  export PYTHONPATH=/tmp/site:$PWD/src
  IFS=';' read -r -a DS <<< "${DROPS:-;mlp.act,mlp.down_in;mlp.gate,mlp.up,mlp.act,mlp.down_in;attn.q,attn.k,attn.v}"
  for i in $(seq "${ROUNDS:-2}"); do
    for d in "${DS[@]}"; do
      echo "=== left out: ${d:-nothing}, round $i" | tee -a "$OUT/positions.log"
      timeout 90 "${P[@]}" --n-samples 16 --batch-sizes "${BATCHES:-4}" --repeats 3 ${d:+--drop-positions $d} 2>&1 \
          | tee -a "$OUT/positions.log" | grep -E "ratio|phases"
    done
  done
  exit 0
fi
if [ "$PART" = timeline ]; then
  # SRC=old_src/src times another src folder; SWEEP=0 leaves out the kernel sweep, BATCHES picks the batch sizes
  export PYTHONPATH=/tmp/site:$PWD/${SRC:-src}
  timeout 150 python3 bench/profile_phases.py --synthetic 7b --device cuda --batch-sizes "${BATCHES:-4,1}" \
      --repeats 2 --timeline --results-ops 2>&1 | tee "$OUT/timeline${SRC:+-old}.log" | grep -E "^batch [0-9]+( r|:)"
  [ "${SWEEP:-1}" = 1 ] || exit 0
  timeout 100 python3 bench/kernel_sweep.py --shapes 4x4096,4x11008 2>&1 | tee "$OUT/sweep.log" | grep -v -i warn
  exit 0
fi
[ "$PART" = final ] && : "${LANE_TIMEOUT:=330}"
if [ "$PART" = decide ]; then
  # rounds: a profile's finalize_s moves from process to process
  : "${OLD:?set OLD to the src folder of the code to compare with}"
  for i in $(seq "${ROUNDS:-2}"); do
    for v in src "$OLD"; do
      echo "=== $v, round $i" | tee -a "$OUT/overhead.log"
      PYTHONPATH=/tmp/site:$PWD/$v timeout 130 "${P[@]}" --n-samples 16 --batch-sizes 4,1,16 --repeats 3 2>&1 \
          | tee -a "$OUT/overhead.log" | grep -E "ratio|phases"
    done
  done
  PYTHONPATH=/tmp/site:$PWD/src timeout 100 python3 bench/device_consistency.py > "$OUT/consistency.log" 2>&1
  tail -1 "$OUT/consistency.log"
  exit 0
fi
if [ "$PART" = lane ] || [ "$PART" = final ]; then
  # Six pytest workers (2 threads each) share the GPU when pytest-xdist travelled in .whl (the tiny models leave
  # it idle most of the time): 207 s in session 10; 4 workers 215-263 s, one process 545 s (session 9)
  WORKERS=()
  PYTHONPATH=/tmp/site python3 -c "import xdist" 2>/dev/null && WORKERS=(-n "${LANE_WORKERS:-6}")
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONPATH=/tmp/site:$PWD/src timeout "${LANE_TIMEOUT:-560}" python3 -m pytest -q -p no:randomly "${WORKERS[@]}" \
      -p no:benchmark --durations=10 --device cuda tests/test_lane.py tests/test_stats_triton.py > "$OUT/lane.log" 2>&1
  tail -5 "$OUT/lane.log"
  [ "$PART" = lane ] && exit 0
  export PYTHONPATH=/tmp/site:$PWD/src
  timeout 100 python3 bench/device_consistency.py > "$OUT/consistency.log" 2>&1
  tail -1 "$OUT/consistency.log"
  timeout 150 "${P[@]}" --n-samples 16 --batch-sizes 4,1,16 --repeats 3 > "$OUT/overhead.log" 2>&1
  grep -E "ratio|memory" "$OUT/overhead.log"
  exit 0
fi
: "${OLD:?set OLD to the src folder of the code to compare with}"
LOG=$OUT/ab.log
{
  for v in src "$OLD"; do
    echo "=== stats_update, $v"
    PYTHONPATH=/tmp/site:$PWD/$v timeout 90 python3 bench/stats_update.py --device cuda --dtype bfloat16 \
        --rows 8192 --batch 4 --channels 4096,11008 --modes graphs,triton --kernels 2>&1 | grep -v "^\s*0\.[0-9] us"
  done
  for i in 1 2; do
    for v in src "$OLD"; do
      echo "=== profile, $v, run $i"
      PYTHONPATH=/tmp/site:$PWD/$v timeout 100 "${P[@]}" --n-samples 16 --batch-sizes 4,1 --repeats 3 2>&1
    done
  done
} > "$LOG" 2>&1
grep -E "^===|ratio|stats_pass|candidates|gatherTopK" "$LOG" | cut -c1-160
