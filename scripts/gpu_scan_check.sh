#!/usr/bin/env bash
# The GPU figures of issue 23 in ONE run of at most ~5 minutes, on a machine with one CUDA GPU and no network.
# Not run yet: written on a machine without a GPU (docs/benchmarks.md says what is still to be measured).
#
#   bash scripts/gpu_scan_check.sh            # from the repository root; PYTHON=... to pick the interpreter
#   SMOKE=1 bash scripts/gpu_scan_check.sh    # checks the plumbing on a CPU: tiny models, 64 images, no GPU
#
# What it does (random weights, --pretrained none, so nothing downloads; HF_HUB_OFFLINE=1):
#   1. checks the interpreter has torch with CUDA, torchvision and open_clip, and prints one JSON line with the
#      versions and the GPU;
#   2. generates photo-like JPEGs on this machine (scripts/bench_scan.py: LAION-like sizes around 500 x 400,
#      quality 90), 4096 of them, once, in a temporary folder;
#   3. scripts/bench_scan.py on them, one JSON line each: RN50x4 image_block_4_5 (2048 of the images, batch 256)
#      and ViT-B-32 image_embedding (all 4096, batch 512), each with --decode pil and --decode torchvision:
#      scan_img_s against forward_img_s (the ratio; goals: RN50x4 >= 0.8, ViT-B-32 >= 2,500 images/s), the
#      stages (busy seconds per stage, CUDA events) and null_img_s (the input pipeline's ceiling, --null-model);
#   4. scripts/bench_sae.py --targets rn50x4 on the GPU: SAE training vectors/s (and the feature scan overhead).
# Every line also goes to $OUT/gpu_scan_check.jsonl when $OUT is set (the device tool's output folder). A step
# that fails prints {"step": ..., "error": ...} and the next one runs. Each step's time limit is cut to what is
# left of a 290 s budget (a step with under 10 s left is skipped), so the whole run stays under 5 minutes.
# Estimated on one H200 with 16 CPUs from the earlier measurements: about 3 minutes.
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CPUS="$(nproc)"
if [ "${SMOKE:-0}" = 1 ]; then       # the same steps on the CPU with tiny models (a check of this script)
    DEVICE=cpu; IMAGES=64; RN=(nl-tiny-RN image_block_4_0); VIT=(nl-tiny-ViT image_embedding); SAE=toy
    RN_BATCH=16; VIT_BATCH=16; SAE_N=(--train-n 32 --scan-n 16 --images-per-forward 16)
else
    DEVICE=cuda; IMAGES=4096; RN=(RN50x4 image_block_4_5); VIT=(ViT-B-32 image_embedding); SAE=rn50x4
    RN_BATCH=256; VIT_BATCH=512; SAE_N=(--train-n 256 --scan-n 128 --images-per-forward 64)
fi
WORKERS=$(( CPUS > 1 ? CPUS - 1 : 1 ))
THREADS=$(( CPUS < 16 ? CPUS : 16 ))
DATA="$(mktemp -d /tmp/gpu_scan_check.XXXXXX)"
LOG="${OUT:+$OUT/gpu_scan_check.jsonl}"
START=$SECONDS
trap 'rm -rf "$DATA"' EXIT

emit() {   # one JSON line to stdout and to $OUT/gpu_scan_check.jsonl
    echo "$1"
    if [ -n "$LOG" ]; then echo "$1" >> "$LOG"; fi
}

step() {   # step NAME TIMEOUT COMMAND...: the command's last stdout line (its JSON), or an error line
    local name="$1" limit="$2"
    shift 2
    local left=$(( 290 - (SECONDS - START) ))
    if (( left < 10 )); then
        emit "{\"step\": \"$name\", \"skipped\": \"the 290 s budget is spent\"}"
        return
    fi
    if (( limit > left )); then limit=$left; fi
    local out err
    err="$(mktemp)"
    out="$(timeout "$limit" "$@" 2>"$err")"
    local rc=$?
    if [ $rc -eq 0 ] && [ -n "$out" ]; then
        emit "$(echo "$out" | tail -n 1)"
    else
        emit "{\"step\": \"$name\", \"error\": \"exit $rc\", \"stderr\": $(tail -c 600 "$err" | "$PYTHON" -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}"
    fi
    rm -f "$err"
}

step environment 30 "$PYTHON" - <<'EOF'
import json, os, torch, torchvision, open_clip
print(json.dumps({"step": "environment", "torch": torch.__version__, "torchvision": torchvision.__version__,
                  "open_clip": open_clip.__version__, "cuda": torch.cuda.is_available(),
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "cpus": os.cpu_count(), "load_avg": os.getloadavg()[0]}))
EOF

# the images, once: 4096 photo-like JPEGs (bench_scan.write_jpegs, all CPUs)
step images 45 "$PYTHON" -c "
import json, sys, time
sys.path.insert(0, 'scripts')
from pathlib import Path
from bench_scan import write_jpegs
started = time.perf_counter()
write_jpegs(Path('$DATA/all'), $IMAGES, 500, seed=0)
for path in sorted(Path('$DATA/all').glob('*.jpg'))[:$IMAGES // 2]:
    Path('$DATA/half').mkdir(exist_ok=True)
    (Path('$DATA/half') / path.name).symlink_to(path)
print(json.dumps({'step': 'images', 'images': $IMAGES, 'seconds': round(time.perf_counter() - started, 1)}))
"

COMMON=(--device "$DEVICE" --pretrained none --workers "$WORKERS" --threads "$THREADS" --top-k 32 --null-model
        --skip-rss --skip-bf16)
for decode in pil torchvision; do
    step "${RN[0]}-$decode" 55 "$PYTHON" scripts/bench_scan.py --model "${RN[0]}" --layer "${RN[1]}" \
        --data "$DATA/half" --batch-size "$RN_BATCH" --decode "$decode" "${COMMON[@]}"
done
for decode in pil torchvision; do
    step "${VIT[0]}-$decode" 50 "$PYTHON" scripts/bench_scan.py --model "${VIT[0]}" --layer "${VIT[1]}" \
        --data "$DATA/all" --batch-size "$VIT_BATCH" --decode "$decode" "${COMMON[@]}"
done

# SAE training throughput on the GPU (RN50x4 image_block_4_5, 8x features, k 32; 256 images = 20,736 vectors)
step "sae-$SAE" 60 "$PYTHON" scripts/bench_sae.py --targets "$SAE" --device "$DEVICE" "${SAE_N[@]}" \
    --workers "$WORKERS" --threads "$THREADS" --repeats 1
emit "{\"step\": \"done\", \"seconds\": $(( SECONDS - START ))}"
