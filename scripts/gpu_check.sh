#!/usr/bin/env bash
# The one GPU check, under 8 minutes on one H100/H200:
#   1. python -m pytest -q tests/gpu   (bf16 vs the CPU fp32 loss curve, fp16 + GradScaler, compile vs eager,
#      eval and the serve engine on the GPU == CPU,
#      1-GPU NCCL DDP and FSDP2)
#   2. gptforge bench --sweep on `small` (124M, GPT-2 BPE), context 1024, bf16, compile on: the largest
#      micro-batch that fits (halving from 64), measured
#   3. gptforge bench --single on `llama-1b` under FSDP2 (torchrun, one process), bf16
#   4. gptforge bench --to-loss on `small` (124M, GPT-2 BPE, context 1024): GPT-2's block and recipe (AdamW, cosine)
#      against the default (Qwen3 block, Muon, WSD): time and tokens to the first one's final val loss
#   5. ONE table of 2 and 3: ms/step, tokens/s, MFU, peak memory (JSON files in $GPTFORGE_CHECK_OUT)
#
# usage: scripts/gpu_check.sh [--dry-run]
#   --dry-run: the same steps end to end on the CPU with tiny settings (micro preset, 2 layers, a few steps),
#              to show the check is wired where there is no GPU. Without it, a machine where PyTorch sees no GPU
#              stops at once with one line (exit 2).
# env: GPTFORGE_CHECK_OUT (default runs/gpu_check), GPTFORGE_CHECK_DATA (a prepared dataset or text; default:
#      the built-in Shakespeare), PYTHON (default python), GPTFORGE_CACHE (default: the repository's
#      .cache/gptforge, as the tests use: a machine without internet needs the Shakespeare corpus there, e.g.
#      copied with the working tree after one run of the tests elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
export GPTFORGE_CACHE="${GPTFORGE_CACHE:-$PWD/.cache/gptforge}"

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; elif [[ $# -gt 0 ]]; then echo "usage: $0 [--dry-run]" >&2; exit 2; fi
PY="${PYTHON:-python}"
if (( ! DRY )); then
    # no GPU: stop at once (else every GPU test skips and the 124M runs train on the CPU)
    if ! GPU=$("$PY" -c 'from gptforge.hardware import detect; d = detect(); print(d.describe() if d.is_gpu else "")' \
               2>/dev/null); then
        echo "gpu_check.sh: error: '$PY' cannot import gptforge and torch; activate the environment gptforge is" \
             "installed in, or set PYTHON to its python" >&2
        exit 2
    fi
    if [[ -z "$GPU" ]]; then
        echo "gpu_check.sh: error: no GPU visible to PyTorch (torch.cuda.is_available() is False); run it on a" \
             "machine with a GPU (check CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES and the driver), or with" \
             "--dry-run to check the wiring on the CPU" >&2
        exit 2
    fi
    echo "== gpu_check on $GPU" >&2
fi
OUT="${GPTFORGE_CHECK_OUT:-runs/gpu_check}"
mkdir -p "$OUT"
DATA=()
if [[ -n "${GPTFORGE_CHECK_DATA:-}" ]]; then DATA=(--data "$GPTFORGE_CHECK_DATA"); fi

if (( DRY )); then
    TINY=(--model.n_layer=2 --model.d_model=64 --model.n_head=4 --model.d_ff=256 --model.block_size=64)
    SMALL=(--preset micro --device cpu --precision fp32 --micro-batch 8 --steps 3 --warmup 1)
    SMALL_EXTRA=("${TINY[@]}")
    LLAMA=(--preset micro --device cpu --precision fp32 --micro-batch 4 --steps 3 --warmup 1)
    LLAMA_EXTRA=("${TINY[@]}" --model.arch=llama --parallel.strategy=fsdp)
    TO_LOSS=(--preset micro --device cpu --precision fp32 --micro-batch 4 --steps 6 --eval-every 3)
    TO_LOSS_EXTRA=("${TINY[@]}")
    GPT2_FF=256
else
    SMALL=(--preset small --block-size 1024 --precision bf16 --compile --micro-batch 64 --steps 30 --warmup 10)
    SMALL_EXTRA=(--data.tokenizer=gpt2)
    LLAMA=(--preset llama-1b --precision bf16 --micro-batch 8 --steps 20 --warmup 8)
    LLAMA_EXTRA=(--data.tokenizer=gpt2 --parallel.strategy=fsdp)
    # GPT-2 BPE, context 1024, 16 x 1024 tokens a step, 400 steps each (~6.5M tokens), val loss every 50 steps
    TO_LOSS=(--preset small --block-size 1024 --precision bf16 --compile --micro-batch 16 --steps 400 --eval-every 50)
    TO_LOSS_EXTRA=(--data.tokenizer=gpt2)
    GPT2_FF=3072
fi

echo "== 1/4 tests/gpu" >&2
"$PY" -m pytest -q tests/gpu
echo "== 2/4 small: sweep for the largest micro-batch that fits" >&2
"$PY" -m gptforge bench --sweep --sweep-grid none "${SMALL[@]}" "${DATA[@]}" --json "$OUT/small.json" \
    -- "${SMALL_EXTRA[@]}"
echo "== 3/4 llama-1b under FSDP2 (torchrun, one process)" >&2
"$PY" -m gptforge bench --single "${LLAMA[@]}" "${DATA[@]}" --json "$OUT/llama-1b.json" -- "${LLAMA_EXTRA[@]}"
echo "== 4/4 small: time to a validation loss, GPT-2's block and recipe (AdamW, cosine) vs the default" >&2
GPT2_RECIPE="model.arch=gpt2 model.qk_norm=false model.bias=true model.d_ff=$GPT2_FF train.optimizer=adamw \
train.schedule=cosine train.lr=6e-4 train.min_lr_ratio=0.1"
"$PY" -m gptforge bench --to-loss "$GPT2_RECIPE" "" "${TO_LOSS[@]}" "${DATA[@]}" --json "$OUT/small_to_loss.json" \
    -- "${TO_LOSS_EXTRA[@]}"
echo "== gpu_check: one table" >&2
"$PY" -m gptforge.bench.report "small=$OUT/small.json" "llama-1b-fsdp=$OUT/llama-1b.json"
