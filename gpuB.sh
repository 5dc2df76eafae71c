[ -f /tmp/m/model.gguf ] || cat /tmp/m/a .gguf-parts/b > /tmp/m/model.gguf
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
printf '#!/bin/sh\nexec python3 -c "import sys; from outlierlab.cli import app; sys.argv[0]=\\"outlierlab\\"; app()" "$@"\n' > /tmp/ol; chmod +x /tmp/ol
git log --oneline | head -1
echo "== lane"; timeout 330 python3 -m pytest -q -p no:randomly -p no:xdist -p no:benchmark --device cuda tests/test_lane.py tests/test_stats_triton.py 2>&1 | tail -12
echo "== scale stream test"; timeout 100 python3 -m pytest -q -p no:randomly -p no:xdist -p no:benchmark --device cuda tests/test_scale.py -k stream_to_the_lane 2>&1 | tail -5
echo "== default model profile 2x128 (cold, warm)"
for i in 1 2; do timeout 60 /usr/bin/time -f "profile wall %e s" /tmp/ol profile --device cuda --model /tmp/m/model.gguf -n 2 --seq-len 128 --out /tmp/p$i > /tmp/p$i.log 2>&1; tail -2 /tmp/p$i.log; grep -ho '"trace_s": [0-9.]*' -r /tmp/p$i | head -1; done
