"""CoCoMix vs NTP on real English text: teacher -> SAE -> labels -> students, several seeds, one report.

The corpus is the user-side text of the shared real datasets (yelp reviews, rotten-tomatoes snippets, nq_open
questions, spider questions: ``messages.1.content``), read in place from ``../shared/data/llm_jepa`` through a
temporary folder of links. Everything else is ``configs/cocomix/tiny_cpu.yaml``; extra ``key=value`` arguments
override it (e.g. ``pipeline.arms=[mix_only,add]`` to add ablations to the same run folder: finished stages are
skipped).

    python benchmarks/cocomix_real_text.py                      # ntp + cocomix, seeds 0 1 2
    python benchmarks/cocomix_real_text.py "pipeline.arms=[ntp,cocomix,mix_only,concept_only,add,pause,ntp_flops]" "pipeline.seeds=[0]"
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
    links = Path(tempfile.gettempdir()) / "conceptlm-cocomix-real-text"
    links.mkdir(exist_ok=True)
    for f in FILES:
        (links / f).unlink(missing_ok=True)
        (links / f).symlink_to(SHARED / f)
    overrides = [f"corpus.source={links}", "corpus.text_field=messages.1.content", "corpus.n_documents=0",
                 "run.name=cocomix_real_text", "pipeline.seeds=[0,1,2]", "train.progress=false",
                 "labels.progress=false", *sys.argv[1:]]
    cfg = load_config(CocomixConfig, REPO / "configs" / "cocomix" / "tiny_cpu.yaml", overrides)
    summary = pipeline(cfg, command="python benchmarks/cocomix_real_text.py " + " ".join(sys.argv[1:]))
    print(Path(summary["report"]["markdown"]).read_text(encoding="utf-8"))
    print(json.dumps({k: v for k, v in summary.items() if k != "report"}, indent=2, default=str))


if __name__ == "__main__":
    main()
