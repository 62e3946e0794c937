"""CoCoMix vs NTP on real English text: teacher -> SAE -> labels -> students, several seeds, one report.

The corpus is the user-side text of the shared real datasets (yelp reviews, rotten-tomatoes snippets, nq_open
questions, spider questions: ``messages.1.content``), read in place from ``../shared/data/llm_jepa`` through a
temporary folder of links. Everything else is ``configs/cocomix/tiny_cpu.yaml``; extra ``key=value`` arguments
override it (e.g. ``pipeline.arms=[mix_only,add]`` to add ablations to the same run folder: finished stages are
skipped).

    python benchmarks/cocomix_real_text.py                      # ntp + cocomix, seeds 0 1 2

``--smollm2 FRACTION`` uses SmolLM2-135M-Instruct as the teacher (SAE after block 15 of 30, 4,096 latents, k 32;
students share its 49,152-token vocabulary) on the first FRACTION of each file's records, in the run folder
``cocomix_real_text_smollm2`` -- the reduced CPU run (all four files hold ~870k SmolLM2 tokens; labels cost
~200 tokens/s on one CPU thread):

    python benchmarks/cocomix_real_text.py --smollm2 0.25 "pipeline.arms=[ntp,cocomix,add]" "pipeline.seeds=[0]"
    python benchmarks/cocomix_real_text.py "pipeline.arms=[ntp,cocomix,mix_only,concept_only,add,pause,ntp_flops]" \
        "pipeline.seeds=[0]"
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "llm_jepa"
FILES = ("yelp_test.jsonl", "rotten_tomatoes_train.jsonl", "nq_open_train.jsonl", "spider_train.jsonl")


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    missing = [f for f in FILES if not (SHARED / f).is_file()]
    if missing:
        sys.exit(f"needs {SHARED} with {', '.join(missing)}")
    from conceptlm.cocomix.config import CocomixConfig
    from conceptlm.cocomix.pipeline import pipeline
    from conceptlm.core.config import load_config

    # a fixed folder: the corpus identity recorded by the teacher and the label cache names it, so a rerun in the
    # same run folder resumes instead of refusing the caches
    args = sys.argv[1:]
    fraction = None
    if args[:1] == ["--smollm2"]:
        if len(args) < 2 or not 0 < float(args[1]) <= 1:
            sys.exit("--smollm2 takes the fraction of each file's records to use, in (0, 1]")
        fraction, args = float(args[1]), args[2:]
    links = Path(tempfile.gettempdir()) / "conceptlm-cocomix-real-text"
    if fraction is not None:
        links = links.with_name(f"{links.name}-{fraction:g}")
    links.mkdir(exist_ok=True)
    for f in FILES:
        (links / f).unlink(missing_ok=True)
        if fraction is None:
            (links / f).symlink_to(SHARED / f)
        else:  # the first records of each file, so every source keeps its share
            lines = (SHARED / f).read_text(encoding="utf-8").splitlines(keepends=True)
            (links / f).write_text("".join(lines[: max(1, round(fraction * len(lines)))]), encoding="utf-8")
    overrides = [f"corpus.source={links}", "corpus.text_field=messages.1.content", "corpus.n_documents=0",
                 "run.name=cocomix_real_text", "pipeline.seeds=[0,1,2]", "train.progress=false",
                 "labels.progress=false"]
    if fraction is not None:
        overrides += ["run.name=cocomix_real_text_smollm2", "teacher.path=smollm2-135m", "teacher.layer=15",
                      "sae.n_latents=4096", "sae.k=32", "sae.steps=200", "student.n_concepts=4096",
                      "student.concept_k=32", "train.max_steps=200", "train.eval_every=25", "pipeline.seeds=[0]"]
    overrides += args
    cfg = load_config(CocomixConfig, REPO / "configs" / "cocomix" / "tiny_cpu.yaml", overrides)
    summary = pipeline(cfg, command="python benchmarks/cocomix_real_text.py " + " ".join(sys.argv[1:]))
    print(Path(summary["report"]["markdown"]).read_text(encoding="utf-8"))
    print(json.dumps({k: v for k, v in summary.items() if k != "report"}, indent=2, default=str))


if __name__ == "__main__":
    main()
