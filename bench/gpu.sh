#!/usr/bin/env bash
# Every GPU check and benchmark in one call, for a lent GPU machine that has its own torch,
# torchvision and Triton (what is missing there travels as wheels in .whl/, images in .imgs/).
# Each step has its own time limit, so one that hangs leaves time to the others; logs and the
# bench/results JSON files go to $OUT.
#
#     OUT=/tmp/gpu bash bench/gpu.sh [IMAGES]
#     STEPS="peers profile" bash bench/gpu.sh    # only the named steps
set -u
STEPS=${STEPS:-all}
OUT=${OUT:-/tmp/gpu-bench}
IMAGES=${1:-.imgs/sample}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "wheel install failed"
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi -L
python3 -c "import torch, torchvision, triton; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'triton', triton.__version__)"

# a harvest-sized image set: the sample sixteen times over, under other names (links)
rm -rf /tmp/imgs && mkdir -p /tmp/imgs
for r in $(seq 16); do for f in "$IMAGES"/*; do ln -s "$(realpath "$f")" "/tmp/imgs/r${r}_$(basename "$f")"; done; done
N=$(ls /tmp/imgs | wc -l)

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  [ "$STEPS" = all ] || [[ " $STEPS " == *" ${name%%-*} "* ]] || [[ " $STEPS " == *" $name "* ]] || return 0
  echo; echo "=== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

step check_cuda 100 python3 bench/check_cuda.py --images "$IMAGES" --out "$OUT/check_cuda.json"
step peers 100 python3 bench/bench_peers.py --device cuda
step e2e 90 python3 bench/bench_e2e.py --device cuda --rounds 2
step e2e-4M 60 python3 bench/bench_e2e.py --device cuda --rounds 1 --vectors 4194304
harvest_rate() {  # harvest_rate DECODE: images/s of each shard of 1000 (steady state after the first)
  python3 -m helpers harvest --images /tmp/imgs --out "/tmp/h-$1" --weights random --device cuda --batch-size 256 \
    --workers "$(( $(nproc) - 1 ))" --decode "$1" --shard-images 1000 >"$OUT/harvest-$1-run.log" 2>&1 \
    || tail -20 "$OUT/harvest-$1-run.log"
  python3 -c "import json, sys; print('harvest, decode $1, $N images: images/s per shard of 1000:',
    [round(1000 / json.loads(l)['seconds']) for l in open('/tmp/h-$1/harvest.jsonl')])"
}
export -f harvest_rate; export N OUT
for decode in workers device; do step "harvest-$decode" 90 bash -c "harvest_rate $decode"; done
step profile 60 python3 bench/profile_cuda.py
step core 120 python3 bench/bench_core.py --memory --images /tmp/imgs --n-images 512 --batch 128 --rounds 2 --device cuda
step seeing 45 python3 bench/bench_seeing.py --device cuda --sample "$IMAGES"
cp bench/results/*.json "$OUT"/ 2>/dev/null
echo; echo "=== summary"; grep -h -E "^(PASS|FAIL)|checks pass|vs sparsify|sparsify / ours|images/s|per shard|^  (ours|sparsify|encoder|one-pass|pass-per|sparse|dense)" "$OUT"/*.log
