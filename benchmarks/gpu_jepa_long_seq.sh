#!/usr/bin/env bash
# The GPU check of LLM-JEPA's long-sequence path, one call on one CUDA GPU (about 3-5 minutes on an H100/H200):
#   bash benchmarks/gpu_jepa_long_seq.sh OUT_DIR
# Runs benchmarks/jepa_long_seq.py (SmolLM2-135M's shape, random weights, bf16 autocast) at T_LM = 1024 (batch 8)
# and T_LM = 2048 (batch 4): NTP, separate, packed with the dense tree mask and packed with the FlexAttention block
# mask, side by side. Each writes OUT_DIR/long_seq_<T>.json: median s/step, ratios to NTP and to the token bound,
# peak memory, and first_step_max_abs_diff (every arm's first-step LM / JEPA loss and grad norm from the same
# weights and batch: the exactness check of the flex path's backward, which CPU tests cannot run).
set -euo pipefail
out=${1:-runs/gpu_long_seq}
mkdir -p "$out"
export PYTHONPATH=src HF_HUB_OFFLINE=1 CONCEPTLM_NO_PROGRESS=1 PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
python3 benchmarks/jepa_long_seq.py --lm-len 1024 --code-len 192 --batch 8 --steps 20 --warmup 5 | tee "$out/long_seq_1024.json"
python3 benchmarks/jepa_long_seq.py --lm-len 2048 --code-len 256 --batch 4 --steps 20 --warmup 5 | tee "$out/long_seq_2048.json"
