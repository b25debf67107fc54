#!/usr/bin/env bash
# Every GPU measurement quoted in the docs, in one run on a lent GPU (H100/H200). Needs ../shared beside the
# repo, or a copy of the parts used here under .carry/shared (Set5, Set14, T91, part of BSD200, the official
# output reference). Writes logs and the trained demo model to $OUT (default runs/gpu-suite).
#   bash benchmarks/gpu_suite.sh [TRAIN_SECONDS]
#   STEPS="device cuda perf" bash benchmarks/gpu_suite.sh      # the performance issue only (at most ~11 minutes)
set -u
OUT=${OUT:-runs/gpu-suite}
TRAIN_SECONDS=${1:-300}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ ! -e ../shared ] && [ -d .carry/shared ]; then ln -s "$PWD/.carry/shared" ../shared; fi
PY=${PY:-python3}
STEPS=${STEPS:-"device cuda perf forward train_speed eval_speed zoo"}  # a subset reruns only those
want() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }
step() { echo; echo "=== $* ($(date +%T))"; }

want device && { step device
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"; }

want cuda && { step CUDA tests
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_models.py -k "cuda or official_output" 2>&1 \
  | tail -5 | tee "$OUT/pytest.txt"; }

want perf && { step "performance suite: workloads x reference/fast x fp32/bf16, and the GPU profile"
timeout 420 $PY benchmarks/perf_suite.py --device cuda 2>&1 | tee "$OUT/perf_suite.txt"
for mode in fast reference; do
  timeout 60 $PY benchmarks/profile_model.py --device cuda --input 240x360 --precision bf16 --mode $mode --top 12 \
    2>&1 | grep -v USDT | tee -a "$OUT/profile_gpu.txt"; done; }

want forward && { step forward speed
timeout 90 $PY benchmarks/model_speed.py --device cuda --sizes T,B,L --input 240 --precision fp32,bf16 --repeats 10 \
  2>&1 | tee "$OUT/model_speed.txt"; }

want train_speed && { step training throughput
timeout 150 $PY benchmarks/train_speed.py --device cuda --sizes T,B --batch 32 --patch 48 2>&1 | tee "$OUT/train_speed.txt"; }

want eval_speed && { step eval speed
timeout 90 $PY benchmarks/eval_speed.py --device cuda --images Set14/comic.png,Set14/monarch.png,Set14/barbara.png \
  2>&1 | tee "$OUT/eval_speed.txt"; }
want zoo || exit 0

step "demo model training (${TRAIN_SECONDS}s)"
ITERS=${ITERS:-$($PY - "$OUT/train_speed.txt" "$TRAIN_SECONDS" <<'PY'
import sys
# iterations that fit the time: EDT-T patches/s from the benchmark above, batch 32, 80% for data and validation
text, seconds = open(sys.argv[1]).read(), float(sys.argv[2])
rows = [line.split() for line in text.splitlines() if line.startswith("EDT-T")]
try:
    rate = float(rows[0][3])  # columns: model, params, s/step, patches/s, peak GiB
except (IndexError, ValueError):
    rate = 300.0
print(int(max(500, min(20000, rate / 32 * seconds * 0.8)) // 100 * 100))
PY
)}
M=$(( ITERS / 2 )); M2=$(( ITERS * 3 / 4 )); M3=$(( ITERS * 7 / 8 )); M4=$(( ITERS * 15 / 16 ))
echo "iterations $ITERS, milestones $M $M2 $M3 $M4"
rm -rf runs/zoo-t-x2
timeout $(( TRAIN_SECONDS + 60 )) $PY -m edtir train configs/zoo-edt-t-sr-x2.yaml --output-dir runs/zoo-t-x2 \
  --iterations "$ITERS" --no-progress "train.milestones=[$M,$M2,$M3,$M4]" "checkpoint.every=$(( ITERS / 10 ))" \
  "val.every=$(( ITERS / 5 ))" 2>&1 | tail -30 | tee "$OUT/train_zoo.txt"
cp runs/zoo-t-x2/log.jsonl "$OUT/train_zoo_log.jsonl" 2>/dev/null
if [ -f runs/zoo-t-x2/model.safetensors ]; then cp runs/zoo-t-x2/model.safetensors "$OUT/edt-t-sr-x2-291.safetensors"
else latest=$(ls -d runs/zoo-t-x2/checkpoints/step_* 2>/dev/null | tail -1)
  [ -n "$latest" ] && cp "$latest/model.safetensors" "$OUT/edt-t-sr-x2-291.safetensors"; fi

step evaluation of the demo model
timeout 60 $PY -m edtir eval --task sr-x2 --weights "$OUT/edt-t-sr-x2-291.safetensors" --data ../shared/data/Set5 \
  --data ../shared/data/Set14 --json "$OUT/eval_zoo.json" 2>&1 | tail -6 | tee "$OUT/eval_zoo.txt"
echo done
