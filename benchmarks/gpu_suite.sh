#!/usr/bin/env bash
# Every GPU measurement quoted in the docs, and the GPU stage of the bundled model, on a lent GPU (H100/H200).
# Needs ../shared beside the repo, or a copy of the parts used here under .carry/shared (Set5, Set14, the 291
# training set (lossless WebP fits the transfer limit), the Rain100 overlap list, the official output reference).
# Writes logs and weights to $OUT (default runs/gpu-suite). Each step is time-boxed; a subset reruns only those:
#   STEPS="device cuda probe perf" bash benchmarks/gpu_suite.sh          # tests, training probe, performance issue
#   STEPS="device kernels cuda perf" bash benchmarks/gpu_suite.sh        # the Triton kernels' tiles, then the suite
#   KERNELS_ARGS="--sweep products" PERF_PATHS=reference,fast-cublas,fast,fast-tf32x3 STEPS="kernels perf" ...
#                          # the product kernel's tiles; whole-model paths by where the products run (perf_suite.py)
#   STEPS="multi" ITERS=6000 MULTI_SECONDS=300 bash benchmarks/gpu_suite.sh   # GPU stage of edt-t-multi-291
#   STEPS="compile" bash benchmarks/gpu_suite.sh          # torch.compile (per block, CUDA graphs) of the fast path
#   STEPS="train" bash benchmarks/gpu_suite.sh            # the training step profiled; eager vs blocks compiled
#   STEPS="finetune" bash benchmarks/gpu_suite.sh         # configs/gpu-edt-t-*-ft.yaml side by side, time-boxed,
#                          each from its task's current default model (FT_FROM=config: from the config's init.path)
# A multi run cut short returns its checkpoint as $OUT/ckpt.tar.part*: put them in .carry/gpu-t-multi/ and carry
# .carry to continue it exactly in the next lease (same iteration count and schedule, read from its config).
# Mind the 64 MiB a lease carries: the eight-task EDT-T checkpoint is 32 MB, the 291 set as lossless WebP 39 MB,
# the repository about 22 MB (most of it the bundled models; superseded ones are retired, `python -m
# edtir.zoo.retire`); a shorter complete schedule per lease, started from the bundled model, avoids the carry.
set -u
OUT=${OUT:-runs/gpu-suite}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ ! -e ../shared ] && [ -d .carry/shared ]; then ln -s "$PWD/.carry/shared" ../shared; fi
PY=${PY:-python3}
STEPS=${STEPS:-"device cuda probe perf"}
want() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }
step() { echo; echo "=== $* ($(date +%T))"; }
MULTI=configs/gpu-edt-t-multi.yaml
EXTRA=${EXTRA:-}  # more key=value overrides for the training steps (a CPU dry run: "train.device=cpu train.batch=1")
DEV=${DEV:-cuda}

want device && { step device
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
nproc | tee -a "$OUT/device.txt"; }

START=$(date +%s); DEADLINE=$(( START + ${BUDGET_SECONDS:-100000} ))  # the multi step fits what is left

cuda_tests() {  # $1: time box in seconds
  timeout "$1" $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_kernels.py tests/test_models.py \
    -k "cuda or official_output or kernels" 2>&1 | tail -12 | tee "$OUT/pytest.txt"; }
weights_of() {  # a run folder's final weights, else its newest checkpoint's (a run stopped by its time box saves one)
  if [ -f "$1/model.safetensors" ]; then echo "$1/model.safetensors"
  else ls -d "$1"/checkpoints/step_*/model.safetensors 2>/dev/null | tail -1; fi; }

want cuda && { step CUDA tests
cuda_tests 75; }

want probe && { step "training probe: the GPU config of the bundled model for ${PROBE_SECONDS:=35} s (speed, data loading)"
rm -rf runs/gpu-probe
timeout -s TERM -k 30 "$PROBE_SECONDS" $PY -m edtir train $MULTI --output-dir runs/gpu-probe --iterations 100000 \
  --no-progress log.every=20 checkpoint.every=100000 $EXTRA 2>&1 | tail -4
cp runs/gpu-probe/log.jsonl "$OUT/probe_log.jsonl" 2>/dev/null; tail -2 "$OUT/probe_log.jsonl"; }

want dwconv && { step "depthwise conv layouts"
timeout 40 $PY benchmarks/dwconv_layouts.py --device cuda 2>&1 | tee "$OUT/dwconv_layouts.txt"; }

want kernels && { step "Triton kernels: tiles swept, each against the eager code it replaces"
timeout ${KERNELS_SECONDS:-150} $PY benchmarks/triton_kernels.py --env "$OUT/kernel_tiles.env" ${KERNELS_ARGS:-} \
  2>&1 | tee "$OUT/triton_kernels.txt"
if [ -f "$OUT/kernel_tiles.env" ]; then set -a; . "$OUT/kernel_tiles.env"; set +a; fi; }  # the later steps use them

want perf && { step "performance suite: workloads x reference/fast-eager/fast x fp32/bf16"
timeout ${PERF_SECONDS:-150} $PY benchmarks/perf_suite.py --device cuda --paths ${PERF_PATHS:-reference,fast-eager,fast} \
  --workloads ${PERF_WORKLOADS:-b-240x360,b-train,set5,b-480x720} --repeats 3 --warmup 1 2>&1 | tee "$OUT/perf_suite.txt"
[ -n "${PERF_TILED-b-4k,b-4k-auto}" ] && timeout 60 $PY benchmarks/perf_suite.py --device cuda \
  --workloads "${PERF_TILED-b-4k,b-4k-auto}" --paths fast --repeats 1 --warmup 1 2>&1 | tee -a "$OUT/perf_suite.txt"
for mode in ${PROFILE_MODES-fast reference}; do
  timeout 25 $PY benchmarks/profile_model.py --device cuda --input 240x360 --precision bf16 --mode $mode --top 12 \
    2>&1 | grep -v USDT | tee -a "$OUT/profile_gpu.txt"; done; }

want compile && for mode in ${COMPILE_MODES:-default reduce-overhead}; do
  step "torch.compile of each block ($mode) against the eager fast path"
  timeout ${COMPILE_SECONDS:-100} $PY benchmarks/perf_suite.py --device cuda --workloads b-240x360 --paths fast \
    --compile "$mode" --repeats 5 --warmup 3 2>&1 | grep -v "^W[0-9]" | tee -a "$OUT/perf_compile.txt"; done

want train && { step "training (#7): where the EDT-B step's time goes, then eager against each block compiled"
timeout ${TRAIN_PROFILE_SECONDS:-60} $PY benchmarks/profile_model.py --train --device cuda --size B --batch 32 \
  --input 48 --precision bf16 --repeats 3 --top 25 2>&1 | grep -v USDT | tee "$OUT/profile_train.txt"
timeout ${TRAIN_SPEED_SECONDS:-60} $PY benchmarks/train_speed.py --device cuda --sizes B,T 2>&1 | tee "$OUT/train_speed.txt"
for mode in ${TRAIN_COMPILE_MODES-default}; do
  timeout ${TRAIN_COMPILE_SECONDS:-180} $PY benchmarks/train_speed.py --device cuda --sizes B --compile "$mode" \
    --warmup 8 2>&1 | grep -v "^W[0-9]" | tee -a "$OUT/train_speed.txt"; done; }

want finetune && {  # the GPU fine-tunes side by side on the one GPU, time-boxed; the CUDA tests run beside them
FT_CONFIGS=${FT_CONFIGS:-"sr-x2 sr-x4 denoise-25 derain-light"}
FT_SECONDS=${FT_SECONDS:-300}; left=$(( DEADLINE - $(date +%s) - 30 ))
[ "$left" -lt "$FT_SECONDS" ] && FT_SECONDS=$left
step "GPU fine-tunes ($FT_CONFIGS) for at most $FT_SECONDS s"
pids=""; mkdir -p runs
for t in $FT_CONFIGS; do
  rm -rf "runs/gpu-t-$t-ft"
  from=""  # the configs name the files their bundled runs started from, some since retired; go on from the best
  [ "${FT_FROM:-default}" = default ] && from="init.path=$($PY -c "from edtir import zoo; print(zoo.path_of(zoo.default_for('$t')))")"
  echo "$t: ${from:-init.path of the config}"
  timeout -s TERM -k 40 "$FT_SECONDS" $PY -m edtir train "configs/gpu-edt-t-$t-ft.yaml" \
    --output-dir "runs/gpu-t-$t-ft" --no-progress $from $EXTRA > "runs/gpu-t-$t-ft.log" 2>&1 & pids="$pids $!"
done
cuda_tests 90
wait $pids
for t in $FT_CONFIGS; do
  tail -2 "runs/gpu-t-$t-ft.log"; tail -1 "runs/gpu-t-$t-ft/log.jsonl" 2>/dev/null | cut -c1-200
  w=$(weights_of "runs/gpu-t-$t-ft")
  [ -n "$w" ] && cp "$w" "$OUT/ft-$t.safetensors" && echo "weights: $w -> $OUT/ft-$t.safetensors"
done
tar -czf "$OUT/ft-logs.tar.gz" runs/gpu-t-*-ft.log runs/gpu-t-*-ft/log.jsonl runs/gpu-t-*-ft/config.yaml 2>/dev/null
for t in ${FT_EVAL-sr-x2 sr-x4}; do [ -f "$OUT/ft-$t.safetensors" ] && timeout 40 $PY -m edtir eval --task $t \
  --weights "$OUT/ft-$t.safetensors" --data ../shared/data/Set5 --device $DEV --no-progress 2>&1 | tail -2; done; }

want multi && {
MULTI_SECONDS=${MULTI_SECONDS:-300}; left=$(( DEADLINE - $(date +%s) - 60 ))  # 60 s: saving, copying, eval
[ "$left" -lt "$MULTI_SECONDS" ] && MULTI_SECONDS=$left
RESUME=""
if ls .carry/gpu-t-multi/ckpt.tar.part* >/dev/null 2>&1; then  # a run that an earlier lease left unfinished
  rm -rf runs/gpu-t-multi && mkdir -p runs && cat .carry/gpu-t-multi/ckpt.tar.part* | tar -xf - -C runs || exit 1
  ITERS=$($PY -c "import yaml; print(yaml.safe_load(open('runs/gpu-t-multi/config.yaml'))['train']['iterations'])")
  RESUME=--resume; echo "resuming runs/gpu-t-multi ($ITERS iterations in all)"
fi
if [ -z "${ITERS:-}" ]; then  # from the probe's speed: 25 s of start-up, then 95% of the measured rate
  ITERS=$($PY -c "import json,sys; r=json.loads(open(sys.argv[1]).read().splitlines()[-1])['it_per_s']; \
print(max(400, int(r * (int(sys.argv[2]) - 25) * 0.95) // 100 * 100))" "$OUT/probe_log.jsonl" "$MULTI_SECONDS" \
  2>/dev/null || echo 1000); fi
step "GPU stage of edt-t-multi-291: $ITERS iterations, at most $MULTI_SECONDS s"
M1=$(( ITERS / 2 )); M2=$(( ITERS * 3 / 4 )); M3=$(( ITERS * 7 / 8 )); M4=$(( ITERS * 15 / 16 ))
timeout -s TERM -k 40 "$MULTI_SECONDS" $PY -m edtir train $MULTI --output-dir runs/gpu-t-multi --iterations "$ITERS" \
  --no-progress "train.milestones=[$M1,$M2,$M3,$M4]" "checkpoint.every=$(( ITERS / 4 ))" \
  "init.path=${MULTI_INIT:-src/edtir/zoo/edt-t-multi-291.safetensors}" $EXTRA $RESUME 2>&1 | tail -6
cp runs/gpu-t-multi/log.jsonl "$OUT/multi_log.jsonl" 2>/dev/null
if [ ! -f runs/gpu-t-multi/model.safetensors ]; then  # stopped early (SIGTERM saved a checkpoint): bring it
  # back in parts under the 16 MiB limit per file; carry them as .carry/gpu-t-multi/ to resume next lease
  last=$(ls -d runs/gpu-t-multi/checkpoints/step_* 2>/dev/null | tail -1)
  [ -n "$last" ] && tar -C runs -cf - gpu-t-multi/config.yaml gpu-t-multi/log.jsonl "gpu-t-multi/checkpoints/${last##*/}" \
    | split -b 15m -d - "$OUT/ckpt.tar.part" && echo "unfinished: $last saved as $OUT/ckpt.tar.part*"
fi
w=$(weights_of runs/gpu-t-multi)
[ -n "$w" ] && cp "$w" "$OUT/edt-t-multi-gpu.safetensors" && echo "weights: $w"
timeout 40 $PY -m edtir eval --task sr-x2 --weights "$OUT/edt-t-multi-gpu.safetensors" --data ../shared/data/Set5 \
  --device $DEV --no-progress 2>&1 | tail -3 | tee "$OUT/eval_multi.txt"; }
echo done
