"""Interpretability and steering of a CoCoMix student (paper §3.2, Fig. 5, App. B.2).

Three verbs over a pipeline run folder (``{run_dir}/teacher``, ``sae``, ``students/{arm}-s{seed}``):

* :func:`concepts`: what each SAE latent means. Over the corpus's training windows, the teacher's residual stream
  after block ``teacher.layer`` is encoded by the SAE; for every latent the ``top_tokens`` tokens with the largest
  activation are kept (a streaming top-N over batches,
  :class:`~conceptlm.cocomix.descriptions.StreamingTopN`: memory ``C x N`` plus one batch), each with a short
  context snippet, together with how often the latent fires. The result is
  ``{sae_dir}/concepts.json``, written atomically, keyed by the SAE weights' sha256 (and the corpus and the
  settings): it is computed once and recomputed only when one of them changes.
* :func:`explain`: for every token of a prompt, the student's top predicted concepts (softmax of the concept head's
  logits at ``student.insert_layer``, over all ``C`` concepts) with each concept's description.
* :func:`steer`: the prompt continued twice with the same sampling seed, plainly and with
  :class:`~conceptlm.cocomix.model.Steering` of one concept, and the measured effect: how often the concept's
  top-activating tokens occur in each continuation, and the teacher's SAE activation of the concept on each
  continuation (mean over its tokens, read with the whole text as context).

The settings are the ``interpret`` section (:class:`~conceptlm.cocomix.config.InterpretSection`); the
descriptions and activation measurements are :mod:`conceptlm.cocomix.descriptions`.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from conceptlm.cocomix.config import InterpretSection
from conceptlm.cocomix.descriptions import (
    SHOWN_TOKENS,
    ConceptDescriptions,
    clean_text,
    concept_activation,
    describe_concepts,
    describe_tokens,
    interpret_section,
    token_frequency,
)
from conceptlm.cocomix.generate import generate
from conceptlm.cocomix.model import Steering, StudentLM, sae_layer_norm
from conceptlm.core.config import check
from conceptlm.core.errors import CheckpointError, ConfigError
from conceptlm.core.io import atomic_write_text

__all__ = ["concepts", "explain", "steer", "format_explain", "format_steer", "concept_logits", "INTERPRET_DIR"]

INTERPRET_DIR = "interpret"
"""Sub-folder of a student run that receives ``explain.json`` / ``steer.json`` by default."""


# ------------------------------------------------------------------------------------------------ the run's parts
class _Run:
    """What the verbs read from a run folder: teacher + tokenizer, SAE, corpus windows, descriptions, student."""

    def __init__(self, cfg: Any, section: InterpretSection):
        from conceptlm.cocomix.corpus import build_corpus
        from conceptlm.cocomix.labels import compute_device, resolve_sae_dir, resolve_teacher
        from conceptlm.cocomix.sae import load_sae
        from conceptlm.cocomix.teacher import load_teacher

        self.cfg, self.section, self.device = cfg, section, compute_device()
        self.sae_dir = resolve_sae_dir(cfg)
        self.sae = load_sae(self.sae_dir, device=self.device)
        self.teacher, self.tokenizer = load_teacher(cfg.teacher, path=resolve_teacher(cfg, self.sae),
                                                    device=self.device)
        self._check_sae()
        self.splits = build_corpus(cfg.corpus, self.tokenizer)
        self._descriptions: ConceptDescriptions | None = None

    def _check_sae(self) -> None:
        from conceptlm.cocomix.sae import SAE_CONFIG
        from conceptlm.cocomix.teacher import teacher_width

        where = self.sae_dir / SAE_CONFIG if (self.sae_dir / SAE_CONFIG).is_file() else self.sae_dir
        layer = self.sae.meta.get("layer")
        if layer is not None and layer != self.cfg.teacher.layer:
            raise ConfigError(f"the SAE at {self.sae_dir} reads block {layer}, but teacher.layer is "
                              f"{self.cfg.teacher.layer}", path=where, field="teacher.layer")
        width = teacher_width(self.teacher)
        if self.sae.d_in != width:
            raise ConfigError(f"the SAE at {self.sae_dir} reads width {self.sae.d_in}, the teacher's residual has "
                              f"width {width}", path=where, field="d_in")

    @property
    def descriptions(self) -> ConceptDescriptions:
        if self._descriptions is None:
            self._descriptions = describe_concepts(
                self.cfg, teacher=self.teacher, tokenizer=self.tokenizer, sae=self.sae, sae_dir=self.sae_dir,
                windows=self.splits.train.windows, section=self.section)
        return self._descriptions

    def prompt_ids(self, limit: int) -> torch.Tensor:
        """``(1, T)`` the prompt's tokens (``interpret.prompt``, else the start of the first validation window)."""
        s = self.section
        if s.prompt:
            ids = self.tokenizer(s.prompt, add_special_tokens=False)["input_ids"]
            check(len(ids) > 0, "interpret.prompt", "tokenizes to no tokens")
            check(len(ids) <= limit, "interpret.prompt",
                  f"has {len(ids)} tokens; at most {limit} fit (student.max_len={self.cfg.student.max_len}"
                  f"{', minus interpret.max_new_tokens' if limit < self.cfg.student.max_len else ''})")
            return torch.tensor([ids], dtype=torch.long)
        data = self.splits.val if self.splits.val is not None else self.splits.train
        n = min(s.prompt_tokens or data.windows.shape[1], limit)
        return data.windows[:1, :n].clone()

    def student(self, checkpoint: str | Path | None) -> tuple[StudentLM, Path]:
        """The student of ``interpret.arm`` / ``interpret.seed`` (newest checkpoint, or ``checkpoint``)."""
        from conceptlm.cocomix.pipeline import _student_config
        from conceptlm.cocomix.student import load_student
        from conceptlm.core import checkpoint as ckpt_lib

        s = self.section
        sub = _student_config(self.cfg, s.arm, s.seed, len(self.tokenizer))
        if not sub.student.concept_head:
            raise ConfigError(f"arm {s.arm!r} has no concept head (nothing to explain or steer); use cocomix, "
                              "mix_only, concept_only or add", field="interpret.arm")
        self.run_dir = Path(sub.run_dir)
        ckpt = _resolve_checkpoint(checkpoint, self.run_dir, s)
        problem = ckpt_lib.verify_checkpoint(ckpt)
        if problem is not None:
            raise CheckpointError(f"{ckpt}: damaged checkpoint ({problem})")
        return load_student(sub, ckpt).to(self.device), ckpt


def _resolve_checkpoint(checkpoint: str | Path | None, run_dir: Path, s: InterpretSection) -> Path:
    from conceptlm.core import checkpoint as ckpt_lib

    if checkpoint is not None:
        p = Path(checkpoint)
        if (p / ckpt_lib.MANIFEST).is_file():
            return p
        latest = ckpt_lib.find_latest_checkpoint(p) if p.is_dir() else None
        if latest is None:
            raise ConfigError(f"{p} is neither a student checkpoint folder nor a run folder with checkpoints",
                              field="checkpoint")
        return latest
    latest = ckpt_lib.find_latest_checkpoint(run_dir)
    if latest is None:
        raise ConfigError(f"no student checkpoint in {run_dir / 'checkpoints'}; train arm {s.arm!r} with seed "
                          f"{s.seed} first (the pipeline verb) or pass --checkpoint", field="interpret.arm")
    return latest


def concept_logits(model: StudentLM, input_ids: torch.Tensor) -> torch.Tensor:
    """The concept head's logits for every token: ``(B, T) -> (B, T, C)`` fp32 (``z = W_p (LN(h) - pre_bias) +
    b_p`` on the residual stream ``h`` at ``student.insert_layer``, un-steered, before the TopK)."""
    if model.head is None:
        raise ValueError("the student has no concept head")
    seen: list[torch.Tensor] = []
    handle = model.head.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(input_ids)
            head = model.head
            x, _, _ = sae_layer_norm(seen[0])
            return F.linear(x - head.pre_bias, head.predictor.weight, head.predictor.bias).float()
    finally:
        handle.remove()


def _default_output(run: _Run, output: str | Path | None, name: str) -> Path:
    return Path(output) if output is not None else run.run_dir / INTERPRET_DIR / name


def _write(path: Path, result: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------------ verbs
def concepts(cfg: Any, *, checkpoint: str | Path | None = None, output: str | Path | None = None) -> dict[str, Any]:
    """``conceptlm cocomix concepts``: compute (or read back) the SAE's concept descriptions.

    ``checkpoint``: the SAE folder (default ``labels.sae_path``, else ``{run_dir}/sae``); ``output``: the JSON path
    (default ``{sae_dir}/concepts.json``). Returns the path, whether it was computed, and the most frequent
    concepts."""
    if checkpoint is not None:
        cfg = dataclasses.replace(cfg, labels=dataclasses.replace(cfg.labels, sae_path=str(checkpoint)))
    run = _Run(cfg, interpret_section(cfg))
    if output is not None:
        run._descriptions = describe_concepts(cfg, teacher=run.teacher, tokenizer=run.tokenizer, sae=run.sae,
                                              sae_dir=run.sae_dir, windows=run.splits.train.windows,
                                              section=run.section, output=output)
    desc = run.descriptions
    items = sorted(desc.data["concepts"], key=lambda c: -c["frequency"])
    alive = sum(c["fired"] > 0 for c in items)
    print(f"{desc.path}: {desc.n_concepts} concepts over {desc.data['tokens']} tokens, {alive} fire at least once"
          f" ({'computed' if desc.computed else 'read back'})")
    for c in items[:10]:
        print(f"  c{c['concept']:<6} {100 * c['frequency']:6.2f}%  {describe_tokens(c['tokens'][:5])}")
    return {"path": str(desc.path), "computed": desc.computed, "concepts": desc.n_concepts, "firing": alive,
            "tokens": desc.data["tokens"],
            "most_frequent": [{k: c[k] for k in ("concept", "frequency", "description")} for c in items[:10]]}


def _token_rows(tokenizer, ids: list[int], probs: torch.Tensor, logits: torch.Tensor, k: int,
                desc: ConceptDescriptions) -> list[dict[str, Any]]:
    top_p, top_i = probs.topk(k, dim=-1)
    rows = []
    for t, tok in enumerate(ids):
        rows.append({"position": t, "token_id": tok, "token": clean_text(tokenizer.decode([tok])), "concepts": [
            {"concept": int(c), "p": float(p), "logit": float(logits[t, c]), "description": desc[int(c)]["description"],
             "tokens": desc[int(c)]["tokens"][:SHOWN_TOKENS]}
            for p, c in zip(top_p[t].tolist(), top_i[t].tolist(), strict=True)]})
    return rows


def format_explain(result: dict[str, Any]) -> str:
    """A readable table of :func:`explain`'s result: ``token | concept: description (p)``."""
    width = max([len(repr(r["token"])) for r in result["tokens"]] + [5])
    lines = [f"student {result['checkpoint']}", f"prompt: {result['prompt']!r}",
             f"{'pos':>4}  {'token':<{width}} | top concepts: description (p)"]
    for r in result["tokens"]:
        cells = [f"c{c['concept']}: {describe_tokens(c['tokens'])} ({c['p']:.3f})" for c in r["concepts"]]
        lines.append(f"{r['position']:>4}  {r['token']!r:<{width}} | " + " ; ".join(cells))
    return "\n".join(lines)


def explain(cfg: Any, *, checkpoint: str | Path | None = None, output: str | Path | None = None) -> dict[str, Any]:
    """``conceptlm cocomix explain``: the student's top predicted concepts for every token of the prompt.

    Args:
        cfg: a CoCoMix config with an ``interpret`` section (:class:`InterpretSection`).
        checkpoint: a student checkpoint (or run) folder; default the newest checkpoint of
            ``{run_dir}/students/{arm}-s{seed}``.
        output: JSON path (default ``{student run}/interpret/explain.json``).

    Returns:
        ``{"checkpoint", "arm", "prompt", "concepts_file", "tokens": [{"position", "token_id", "token",
        "concepts": [{"concept", "p", "logit", "description", "tokens"}]}]}``; ``p`` is the softmax over all ``C``
        concept logits of that token.
    """
    section = interpret_section(cfg)
    run = _Run(cfg, section)
    model, ckpt = run.student(checkpoint)
    check(section.top_concepts <= model.config.n_concepts, "interpret.top_concepts",
          f"{section.top_concepts} exceeds student.n_concepts={model.config.n_concepts}")
    desc = run.descriptions
    ids = run.prompt_ids(model.config.max_len).to(run.device)
    logits = concept_logits(model, ids)[0]
    rows = _token_rows(run.tokenizer, ids[0].tolist(), logits.softmax(-1), logits, section.top_concepts, desc)
    result = {"checkpoint": str(ckpt), "arm": section.arm, "seed": section.seed,
              "prompt": clean_text(run.tokenizer.decode(ids[0].tolist())), "concepts_file": str(desc.path),
              "tokens": rows}
    path = _default_output(run, output, "explain.json")
    result["output"] = str(path)
    _write(path, result)
    print(format_explain(result))
    return result


def _most_predicted(logits: torch.Tensor) -> int:
    """The concept that is the arg-max of the most tokens (ties: the larger summed probability)."""
    top1 = logits.argmax(-1).tolist()
    probs = logits.softmax(-1).sum(0)
    counts = Counter(top1)
    return max(counts, key=lambda c: (counts[c], float(probs[c])))


def _continuation(run: _Run, model: StudentLM, prompt: torch.Tensor, steering: Steering | None,
                  section: InterpretSection, concept: int, vocabulary: set[int]) -> dict[str, Any]:
    gen = torch.Generator(device=prompt.device).manual_seed(section.sample_seed)
    seq = generate(model, prompt, max_new_tokens=section.max_new_tokens, temperature=section.temperature,
                   top_k=section.top_k, top_p=section.top_p, generator=gen, steer=steering)
    new = seq[0, prompt.shape[1]:].tolist()
    act = concept_activation(run.teacher, run.sae, run.cfg.teacher.layer, seq, concept, start=prompt.shape[1])
    return {"text": clean_text(run.tokenizer.decode(new)), "token_ids": new,
            "top_token_frequency": token_frequency(new, vocabulary), "sae_activation": act["mean"],
            "sae_fired": act["fired"]}


def format_steer(result: dict[str, Any]) -> str:
    """A readable summary of :func:`steer`'s result."""
    p, s = result["plain"], result["steered"]
    how = f"x{result['factor']:g}" + (" (forced into the kept set)" if result["force"] else "")
    return "\n".join([
        f"student {result['checkpoint']}",
        f"concept c{result['concept']} ({result['concept_choice']}): {result['description']}; fires on "
        f"{100 * result['frequency']:.2f}% of corpus tokens",
        f"prompt : {result['prompt']!r}",
        f"plain  : {p['text']!r}",
        f"steered: {s['text']!r}  [{how}]",
        f"{'':34}{'plain':>9}{'steered':>9}",
        f"{'top-token frequency':34}{p['top_token_frequency']:9.3f}{s['top_token_frequency']:9.3f}",
        f"{'teacher SAE activation (mean)':34}{p['sae_activation']:9.3f}{s['sae_activation']:9.3f}",
        f"{'teacher SAE fires (fraction)':34}{p['sae_fired']:9.3f}{s['sae_fired']:9.3f}",
    ])


def steer(cfg: Any, *, checkpoint: str | Path | None = None, output: str | Path | None = None) -> dict[str, Any]:
    """``conceptlm cocomix steer``: continue the prompt plainly and with one concept amplified (same seed).

    The concept is ``interpret.steer_concept`` (-1: the student's most frequent arg-max concept over the prompt);
    steering multiplies its logit by ``interpret.steer_factor`` before the TopK at every position (prompt and new
    tokens). ``checkpoint`` / ``output`` as in :func:`explain` (default ``{student run}/interpret/steer.json``).

    Returns:
        ``{"checkpoint", "concept", "concept_choice", "description", "frequency", "factor", "force", "prompt",
        "identical", "plain": {...}, "steered": {...}}``; each continuation has ``text``, ``token_ids``,
        ``top_token_frequency`` (fraction of its tokens among the concept's top-activating tokens),
        ``sae_activation`` (the teacher's mean SAE activation of the concept over its tokens) and ``sae_fired``.
    """
    section = interpret_section(cfg)
    run = _Run(cfg, section)
    model, ckpt = run.student(checkpoint)
    if not model.config.compresses:
        raise ConfigError(f"arm {section.arm!r} does not mix its predicted concept (student.mix is "
                          f"{model.config.mix!r}); steering needs cocomix, mix_only or add", field="interpret.arm")
    n_concepts = model.config.n_concepts
    check(section.steer_concept < n_concepts, "interpret.steer_concept",
          f"{section.steer_concept} is out of range: the student has {n_concepts} concepts (0..{n_concepts - 1})")
    limit = model.config.max_len - section.max_new_tokens
    check(limit >= 1, "interpret.max_new_tokens",
          f"{section.max_new_tokens} leaves no room for a prompt in student.max_len={model.config.max_len}")
    prompt = run.prompt_ids(limit).to(run.device)
    concept, choice = section.steer_concept, "interpret.steer_concept"
    if concept < 0:
        concept, choice = _most_predicted(concept_logits(model, prompt)[0]), "most predicted over the prompt"
    desc = run.descriptions
    vocabulary = set(desc[concept]["token_ids"])
    steering = Steering(concept=concept, factor=section.steer_factor, force=section.steer_force)
    plain = _continuation(run, model, prompt, None, section, concept, vocabulary)
    steered = _continuation(run, model, prompt, steering, section, concept, vocabulary)
    result = {"checkpoint": str(ckpt), "arm": section.arm, "seed": section.seed, "concept": concept,
              "concept_choice": choice, "description": desc[concept]["description"],
              "frequency": desc[concept]["frequency"], "factor": section.steer_factor, "force": section.steer_force,
              "prompt": clean_text(run.tokenizer.decode(prompt[0].tolist())), "temperature": section.temperature,
              "sample_seed": section.sample_seed, "identical": plain["token_ids"] == steered["token_ids"],
              "plain": plain, "steered": steered}
    path = _default_output(run, output, "steer.json")
    result["output"] = str(path)
    _write(path, result)
    print(format_steer(result))
    return result
