"""A CoCoMix student run on synthetic windows with random concept labels (the same data in every process), for the
in-process and torchrun tests:

    python -m tests.cocomix.student_recipe_worker run.out_dir=/tmp/runs train.max_steps=4 ...

With ``cocomix.kd_weight > 0`` a fixed-seed NTP student serves as the frozen teacher.
"""

from __future__ import annotations

import sys

import torch

from conceptlm.cocomix.config import StudentSection, StudentTrainConfig
from conceptlm.cocomix.model import StudentLM
from conceptlm.cocomix.student import train_student
from conceptlm.core.config import load_config

TINY = ["student.vocab_size=48", "student.d_model=32", "student.n_layers=2", "student.n_heads=4",
        "student.max_len=16", "student.n_concepts=64", "student.concept_k=4", "student.insert_layer=1",
        "cocomix.k_attr=3"]


class SyntheticWindows:
    """Windows whose next token and labels follow a simple rule (learnable), with a random label mask."""

    name = "synthetic"

    def __init__(self, n: int, seq_len: int, vocab: int, n_concepts: int, k_attr: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(seq_len)) % vocab
        nxt = torch.roll(self.ids, -1, dims=1)
        self.labels = torch.stack([(nxt * (a + 1)) % n_concepts for a in range(k_attr)], dim=-1)
        self.mask = torch.rand(n, seq_len, generator=g) > 0.2
        self.mask[:, -1] = False  # no continuation at the last position

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"id": i, "input_ids": self.ids[i], "concept_labels": self.labels[i], "concept_mask": self.mask[i]}


def datasets(cfg: StudentTrainConfig, n_train: int = 64, n_eval: int = 16):
    s, c = cfg.student, cfg.cocomix
    return (SyntheticWindows(n_train, s.max_len, s.vocab_size, s.n_concepts, c.k_attr, seed=0),
            SyntheticWindows(n_eval, s.max_len, s.vocab_size, s.n_concepts, c.k_attr, seed=1))


def fixed_teacher(s: StudentSection) -> StudentLM:
    torch.manual_seed(1234)
    return StudentLM(StudentSection(style=s.style, vocab_size=s.vocab_size, d_model=16, n_layers=1, n_heads=2,
                                    max_len=s.max_len, mix="none", concept_head=False))


def main(argv: list[str]):
    cfg = load_config(StudentTrainConfig, None, TINY + argv)
    train_ds, eval_ds = datasets(cfg)
    teacher = fixed_teacher(cfg.student) if cfg.cocomix.kd_weight > 0 else None
    return train_student(cfg, train_ds=train_ds, eval_ds=eval_ds if cfg.train.eval_every else None, teacher=teacher)


if __name__ == "__main__":
    print(main(sys.argv[1:]).step)
