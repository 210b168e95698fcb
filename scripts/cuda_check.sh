#!/usr/bin/env bash
# The local engine's CUDA path on a GPU machine, in one pass: the CPU-against-CUDA tests, then the training
# bench (engine against a plain PEFT loop, bfloat16 and float32) and the sampling bench on the device.
#
#   bash scripts/cuda_check.sh OUT_DIR [MODEL_DIR]
#
# MODEL_DIR: a local checkpoint for the benches (default: the packaged SmolLM2-135M-Instruct). A directory
# holding only a config and a tokenizer is initialised at random under seed 0 first (speed does not depend
# on the weights; the benches' loss and output checks compare contenders with each other, not with a
# reference). Every step runs even when one fails; the exit status is 1 when the tests failed.
set -uo pipefail

out=${1:?usage: bash scripts/cuda_check.sh OUT_DIR [MODEL_DIR]}
model=${2:-}
python=${PYTHON:-python3}
mkdir -p "$out"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

# Without CUDA every test would be skipped and pytest would still pass: refuse instead.
$python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "cuda_check: $python cannot use a CUDA device (no torch, or torch.cuda.is_available() is False); nothing checked" >&2
    exit 1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
$python -c "import torch, transformers, peft; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/device.txt"

base=()
if [ -n "$model" ]; then
    if compgen -G "$model/*.safetensors" >/dev/null || compgen -G "$model/pytorch_model*.bin" >/dev/null; then
        base=(--base "$model")
    else
        scratch=$(mktemp -d)
        trap 'rm -rf "$scratch"' EXIT
        weights=$scratch/model
        $python - "$model" "$weights" <<'EOF' || exit 1
import shutil, sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

source, target = sys.argv[1:]
shutil.copytree(source, target)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(target)
print(f"{source}: no weights, initialised at random (seed 0) in {target}")
EOF
        base=(--base "$weights")
    fi
fi

status=0
$python -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    "tests/test_local_engine_speed.py::test_greedy_batch_gives_transformers_generate_tokens" \
    2>&1 | tee "$out/tests.txt" || status=1

$python bench/vs_trl.py --skip-trl --device cuda --dtype bfloat16 --long-shape 16x1024 --max-batch-tokens 16400 "${base[@]}" \
    2>&1 | grep -v -i warn | tee "$out/train_bf16.txt"
$python bench/vs_trl.py --skip-trl --device cuda --dtype float32 "${base[@]}" \
    2>&1 | grep -v -i warn | tee "$out/train_fp32.txt"
$python bench/sampling_vs_generate.py --device cuda --dtype float32 --repeats 1 "${base[@]}" \
    2>&1 | grep -v -i warn | tee "$out/sampling_fp32.txt"
$python bench/sampling_vs_generate.py --device cuda --dtype bfloat16 --skip-batch-1 "${base[@]}" \
    2>&1 | grep -v -i warn | tee "$out/sampling_bf16.txt"
exit $status
