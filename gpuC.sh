export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p $OUT
echo "== 13B offloaded, memory fraction 15 GiB"; timeout 380 python3 bench/pipeline_time.py --model synthetic:llama-13b:tokenizer=$PWD/.tok --device cuda --dtype bfloat16 --quick --memory-fraction-gib 15 --max-memory 0=12GiB,cpu=100GiB --json $OUT/out-13b-offload.json 2>&1 | grep -v "it/s\]" | tail -25
echo "== 13B no limit"; timeout 190 python3 bench/pipeline_time.py --model synthetic:llama-13b:tokenizer=$PWD/.tok --device cuda --dtype bfloat16 --quick --json $OUT/out-13b.json 2>&1 | grep -v "it/s\]" | tail -20
