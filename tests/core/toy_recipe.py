"""A unit that is not a Hugging Face model and has no tokenizer: a tiny next-vector regression transformer on
``core.modules``, with per-example input noise, a (sum, count) metric, an optional frozen teacher that computes the
targets in ``prepare``, and its own config section. Used by the native-unit tests, in process and under torchrun:

    python -m tests.core.toy_recipe run.out_dir=/tmp/runs train.max_steps=4 ...
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from conceptlm.core.config import RunConfig, load_config
from conceptlm.core.modules import Decoder, DecoderConfig
from conceptlm.core.recipe import fit, make_plan
from conceptlm.core.run import run_session
from conceptlm.core.unit import THROUGHPUT_KEY, TrainUnit


@dataclass(kw_only=True)
class ToySection:
    n_examples: int = 64
    n_eval: int = 16
    seq_len: int = 8
    dim: int = 8
    d_model: int = 32
    n_layers: int = 2
    noise: float = 0.1
    teacher: bool = False

    def validate(self) -> None:
        pass


@dataclass(kw_only=True)
class ToyConfig(RunConfig):
    toy: ToySection = field(default_factory=ToySection)


class ToyDataset:
    """Smooth random vector sequences (a fixed generator: the same data in every process)."""

    def __init__(self, n: int, seq_len: int, dim: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(n, 1, dim, generator=g)
        drift = 0.3 * torch.randn(n, 1, dim, generator=g)
        self.x = base + drift * torch.arange(seq_len).view(1, -1, 1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"id": i, "x": self.x[i]}


def collate(items: list[dict]) -> dict:
    return {"ids": torch.tensor([it["id"] for it in items]), "x": torch.stack([it["x"] for it in items])}


class ToyUnit(TrainUnit):
    metric_names = ("cos",)
    throughput_unit = "vectors"

    def __init__(self, c: ToySection):
        super().__init__()
        self.c = c
        self.loss_weights = {"mse": 1.0}
        self.prenet = torch.nn.Linear(c.dim, c.d_model)
        self.decoder = Decoder(DecoderConfig(d_model=c.d_model, n_layers=c.n_layers, n_heads=4, d_ff=64))
        self.postnet = torch.nn.Linear(c.d_model, c.dim)
        if c.teacher:
            self.teacher = torch.nn.Linear(c.dim, c.dim)
            with torch.no_grad():  # rebuilt identically on resume: it is not checkpointed
                g = torch.Generator().manual_seed(1234)
                self.teacher.weight.copy_(torch.randn(c.dim, c.dim, generator=g) / c.dim ** 0.5)
                self.teacher.bias.zero_()
            self.teacher.requires_grad_(False)

    def frozen_modules(self) -> list[str]:
        return ["teacher"] if self.c.teacher else []

    def prepare(self, batch: dict) -> dict:
        batch["y"] = self.teacher(batch["x"]) if self.c.teacher else batch["x"]
        return batch

    def counts(self, batch: dict) -> dict:
        b, t, _ = batch["x"].shape
        return {"mse": b * (t - 1), THROUGHPUT_KEY: b * t}

    def forward(self, batch: dict) -> dict:
        x = batch["x"]
        if self.c.noise > 0 and self.step_rng is not None:
            x = x + self.c.noise * self.step_rng.per_example("input-noise", batch["ids"], x.shape[1:],
                                                             device=x.device)
        pred = self.postnet(self.decoder(self.prenet(x)))[:, :-1]
        target = batch["y"][:, 1:]
        cos = F.cosine_similarity(pred, target, dim=-1)
        return {"mse": ((pred - target) ** 2).sum(-1).sum(), "cos": (cos.sum(), cos.numel())}


def train(cfg: ToyConfig, *, command: str | None = None, on_eval=None):
    with run_session(cfg, command) as session:
        c = cfg.toy
        train_ds = ToyDataset(c.n_examples, c.seq_len, c.dim, seed=0)
        eval_ds = ToyDataset(c.n_eval, c.seq_len, c.dim, seed=1) if c.n_eval else None
        unit = ToyUnit(c)
        plan = make_plan(cfg, session.info, train_ds)  # too little data: an error before anything is written
        session.create_run_dir()
        return fit(cfg, session.info, unit, train_ds=train_ds, eval_ds=eval_ds, collate_fn=collate,
                   source_name="toy", on_eval=on_eval, plan=plan)


if __name__ == "__main__":
    res = train(load_config(ToyConfig, None, sys.argv[1:]))
    print(res.step)
