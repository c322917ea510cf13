#!/usr/bin/env bash
# The GPU checks, run on a lent GPU machine (the workplace's `device` tool) as one script:
# the training path a GPU selects by itself (bf16 autocast, channels_last, pinned memory,
# non-blocking copies) end to end on Fashion-MNIST, then NRD vs CE step times.
# Needs: python3 with torch/torchvision; webdataset + braceexpand wheels in .whl/; the
# Fashion-MNIST idx files in .gpudata/. Writes its figures to $OUT (default /tmp/gpu_out).
set -euo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"

# 0. the demo's shards (sections 1 and 3)
if [ -z "${STEP_TIME_ONLY:-}" ] || [ -n "${LOADER_WORKERS:-}" ]; then
    python3 tools/make_shards.py fashion-mnist --src .gpudata --out /tmp/fmnist --quiet
fi

# 1. the demo config on the GPU, everything else as `make demo` (12 epochs); STEP_TIME_ONLY=1 skips it
if [ -z "${STEP_TIME_ONLY:-}" ]; then
python3 -m nrd_dist.train configs/fmnist_demo.yaml data.train='/tmp/fmnist/train/train-{000000..000001}.tar' \
    data.val.fmnist_test='/tmp/fmnist/test/test-{000000..000001}.tar' run.output_dir=/tmp/demo data.workers=6 \
    2>&1 | tail -25 | tee "$OUT/demo.log"
cp /tmp/demo/summary.json "$OUT/demo_summary.json"
fi

# 2. NRD vs CE step time, data on the GPU; eager, then compiled (COMPILE=0 skips those).
# Each line is appended as soon as it is measured: a run cut short keeps what it has.
SPECS=${SPECS-"preact_resnet34 32 256 10;small_cnn 28 128 10;resnet50 224 256 50;resnet50 224 128 50"}
IFS=';' read -ra specs <<< "$SPECS"
for spec in "${specs[@]}"; do
    set -- $spec
    python3 benchmarks/step_time.py --arch "$1" --image-size "$2" --batch-size "$3" --num-classes "$4" \
        --blocks 5 --steps 20 --warmup 5 | tee -a "$OUT/step_time.jsonl"
    if [ "${COMPILE:-1}" = 1 ]; then
        python3 benchmarks/step_time.py --arch "$1" --image-size "$2" --batch-size "$3" --num-classes "$4" \
            --blocks 5 --steps 20 --warmup 5 --compile | tee -a "$OUT/step_time.jsonl"
    fi
done

# 3. training throughput of the demo config on the GPU (4 epochs, no evaluation): the
# loader feeds it, so this is the loader's rate with W workers, persistent or restarted
# each epoch. LOADER_WORKERS="6 12" runs it.
for workers in ${LOADER_WORKERS:-}; do
    for persistent in true false; do
        python3 -m nrd_dist.train configs/fmnist_demo.yaml data.train='/tmp/fmnist/train/train-{000000..000001}.tar' \
            data.val={} optim.epochs=4 data.samples_per_epoch=${LOADER_SAMPLES:-60000} \
            eval.label_correction_samples=0 data.workers=$workers \
            data.persistent_workers=$persistent run.output_dir=/tmp/loader_${workers}_$persistent > /dev/null 2>&1
        python3 -c "import json, sys; s = json.load(open('/tmp/loader_${workers}_$persistent/summary.json'))
print(json.dumps({'workers': $workers, 'persistent': '$persistent' == 'true',
                  'train_samples_per_s': round(s['train_samples_per_s'], 1), 'wall_time_s': s['wall_time_s']}))" \
            | tee -a "$OUT/demo_throughput.jsonl"
    done
done
