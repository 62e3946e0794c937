#!/usr/bin/env bash
# Steps/s of the tiny configs on one CUDA GPU in bf16 (train.precision=auto picks bf16 autocast on CUDA).
#   bash benchmarks/gpu_tiny_speed.sh OUT_DIR
# Prints, per method, steps/s over steps 101-300 (after warm-up), the last window's tokens/s and loss.
set -euo pipefail
out=${1:-runs/gpu_tiny}
export PYTHONPATH=src HF_HUB_OFFLINE=1 CONCEPTLM_NO_PROGRESS=1 PYTHONUNBUFFERED=1
for method in sft jepa; do
  python3 -m conceptlm $method train --config configs/$method/tiny_cpu.yaml run.out_dir=$out run.name=$method \
    train.max_steps=300 train.eval_every=0 train.log_every=100 train.progress=false run.resume=never > /dev/null
  python3 - "$out/$method/metrics.jsonl" "$method" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
t = rows[-1]["time"] - rows[0]["time"]
print(json.dumps({"method": sys.argv[2], "steps_per_s": 200 / t, "tokens_per_s": rows[-1]["tokens_per_s"],
                  "final_loss": rows[-1]["loss"]}))
PY
done
