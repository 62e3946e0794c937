"""The ``label`` verb on the tiny run of ``tests/cocomix/test_label_shards.py`` (a teacher export and an SAE in
ROOT, built by the test), in one process or under torchrun; one torch thread, so every process computes the same
bytes:

    python -m tests.cocomix.label_shards_worker ROOT OUTPUT SHARD_WINDOWS [SLEEP_PER_BATCH]

With ``SLEEP_PER_BATCH`` > 0 every labelling batch sleeps that long (a slow run that a test can kill mid-way).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from conceptlm.cocomix import labels as labels_mod
from conceptlm.cocomix.attribution import ConceptLabeler
from conceptlm.cocomix.config import CorpusSection, LabelSection, TeacherSection
from conceptlm.core.config import RunSection


@dataclass(kw_only=True)
class LabelConfig:
    """The sections the label verb reads."""

    run: RunSection
    teacher: TeacherSection
    corpus: CorpusSection
    labels: LabelSection

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


def config(root: Path, shard_windows: int) -> LabelConfig:
    """The tiny run's label config (the teacher export in ``root/teacher_export``, the SAE in ``root/run/sae``)."""
    return LabelConfig(run=RunSection(name="run", out_dir=str(root)),
                       teacher=TeacherSection(path=str(root / "teacher_export"), layer=1),
                       corpus=CorpusSection(n_documents=12, window=16, val_fraction=0.25),
                       labels=LabelSection(batch_size=2, chunk_windows=4, shard_windows=shard_windows,
                                           progress=False))


class _Slow(ConceptLabeler):
    delay = 0.0

    def forward(self, ids):
        time.sleep(self.delay)
        return super().forward(ids)


def main(argv: list[str]) -> dict:
    torch.set_num_threads(1)
    root, output, shard_windows = Path(argv[0]), Path(argv[1]), int(argv[2])
    if len(argv) > 3 and float(argv[3]) > 0:
        _Slow.delay = float(argv[3])
        labels_mod.ConceptLabeler = _Slow
    return labels_mod.label(config(root, shard_windows), output=output)


if __name__ == "__main__":
    summary = main(sys.argv[1:])
    # one write per rank: the ranks share the pipe, and print's separate newline write could interleave
    sys.stdout.write(json.dumps({k: summary[k] for k in ("windows", "computed_tokens", "processes")}) + "\n")
    sys.stdout.flush()
