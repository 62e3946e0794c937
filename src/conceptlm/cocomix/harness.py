"""CoCoMix students in lm-evaluation-harness: the model ``conceptlm-cocomix`` and the ``eval-harness`` verb.

:class:`CocomixLM` scores and generates with :class:`~conceptlm.cocomix.model.StudentLM` itself, so the concept
path runs exactly as in training (the concept head's top-K at the insert layer, compression and mixing; no labels,
no steering): ``loglikelihood`` (batched, right-padded: the student is causal, so padding after a row cannot change
it), ``loglikelihood_rolling`` (the harness's disjoint rolling windows of ``student.max_len`` tokens) and
``generate_until`` (KV-cached decoding, :func:`conceptlm.cocomix.generate.generate`, stopped at the first ``until``
string or the end-of-text token). Text is tokenized as the students were trained: the teacher's tokenizer without
special tokens; an empty context is the end-of-text token that separates documents.

Use it

* from Python: ``import conceptlm.cocomix.harness`` registers the name; then
  ``lm_eval.simple_evaluate(model="conceptlm-cocomix", model_args="pretrained=HUB_FOLDER", ...)``, or pass
  ``CocomixLM(model=student, tokenizer=tok)``;
* from the command line: ``python -m conceptlm.harness --model conceptlm-cocomix --model_args
  pretrained=HUB_FOLDER --tasks T --include_path DIR`` (the ``lm_eval`` CLI with this model registered; the
  ``lm_eval`` command itself has no plugin hook). ``lm_eval --model hf --model_args
  pretrained=HUB_FOLDER,trust_remote_code=True`` scores the same folder through its exported transformers model
  (same logits; no KV cache);
* ``conceptlm cocomix eval-harness --config CFG harness.tasks=[T] harness.include_path=DIR``: every trained student
  of ``pipeline.arms`` x ``pipeline.seeds`` (or the one of ``--checkpoint``), results in
  ``{student run}/harness/results.json`` and a summary in ``{run_dir}/harness.json`` (``--output``).

``HUB_FOLDER`` is a folder written by ``conceptlm cocomix export`` (:mod:`conceptlm.cocomix.hub`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from conceptlm.cocomix.generate import generate
from conceptlm.cocomix.model import StudentLM
from conceptlm.core.checkpoint import MANIFEST
from conceptlm.core.errors import ConfigError
from conceptlm.core.io import atomic_write_text

try:
    import lm_eval.models  # noqa: F401  (the harness's own models, before ours: a non-empty registry skips them)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # one line from the CLI instead of a traceback
    raise ConfigError("lm-evaluation-harness is not installed: pip install 'conceptlm[harness]'",
                      field="harness") from None

__all__ = ["CocomixLM", "eval_harness", "evaluate_students", "evaluate_student", "student_harness", "HARNESS_DIR",
           "HARNESS_FILE", "MODEL_NAME"]

MODEL_NAME = "conceptlm-cocomix"
HARNESS_DIR = "harness"
"""Sub-folder of a student run that receives its ``results.json``."""
HARNESS_FILE = "harness.json"
"""The run folder's summary of the ``eval-harness`` verb."""


@register_model(MODEL_NAME)
class CocomixLM(TemplateLM):
    """lm-eval model over a :class:`StudentLM` (see the module docstring).

    Args:
        pretrained: a Hub-format student folder (``conceptlm cocomix export``), when ``model`` is not given.
        model / tokenizer: the student and its (HF) tokenizer, e.g. from a pipeline run.
        batch_size: sequences per forward pass of ``loglikelihood`` (``auto`` = 8).
        device: ``cpu`` / ``cuda`` (default: CUDA when available).
        max_gen_toks: the default generation length (a task's ``max_gen_toks`` overrides it).
        seed: seeds the sampler of ``generate_until`` when a task samples (``do_sample``).
    """

    def __init__(self, pretrained: str | None = None, *, model: StudentLM | None = None, tokenizer: Any = None,
                 batch_size: int | str | None = 8, device: str | None = None, max_gen_toks: int | str = 256,
                 seed: int | str = 0, **_ignored: Any) -> None:
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ConfigError("conceptlm-cocomix needs pretrained=<Hub-format student folder> (or model=)",
                                  field="model_args")
            from conceptlm.cocomix.hub import load_hub_student

            model, own = load_hub_student(pretrained)
            tokenizer = tokenizer if tokenizer is not None else own
        if isinstance(tokenizer, (str, Path)):
            from conceptlm.core.hf import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        if tokenizer is None:
            raise ConfigError("the student has no tokenizer: pass tokenizer=<folder>", field="model_args")
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no end-of-text token (the harness's empty context)",
                              field="model_args")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self._device)
        self.tokenizer = tokenizer
        self.batch_size = 8 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)

    # ------------------------------------------------------------------------------------------- basics
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_len

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "conceptlm-cocomix").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        """``[(cache key, context ids, continuation ids)]`` -> ``[(sum log p(continuation), is greedy)]``; the
        input is the last ``max_len`` tokens of context + continuation (minus the last)."""
        limit = self.max_length
        rows = []
        for _, ctx, cont in requests:
            whole = (list(ctx) + list(cont))[-(limit + 1):]
            inp = whole[:-1]
            n = min(len(cont), len(inp))
            rows.append((inp, list(cont)[len(cont) - n:]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = len(rows[batch[0]][0])
            ids = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
            for j, i in enumerate(batch):
                ids[j, :len(rows[i][0])] = torch.tensor(rows[i][0], dtype=torch.long)
            logp = self.model(ids.to(self.device)).logits.float().log_softmax(-1)
            for j, i in enumerate(batch):
                inp, target = rows[i]
                lp = logp[j, len(inp) - len(target):len(inp)]
                tgt = torch.tensor(target, dtype=torch.long, device=lp.device)
                answer = (float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all()))
                out[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            total = sum(ll for ll, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows]))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # ------------------------------------------------------------------------------------------- generation
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out = []
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        for context, gen_kwargs in [r.args for r in requests]:
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = max(1, min(int(kw.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1))
            sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            ctx = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            n_ctx = len(ctx)

            def stop(seq: torch.Tensor, n_ctx: int = n_ctx, until: list[str] = until) -> bool:
                new = seq[0, n_ctx:].tolist()
                return new[-1] == self.eot_token_id or any(u in self.tok_decode(new) for u in until)

            seq = generate(self.model, torch.tensor([ctx], dtype=torch.long, device=self.device),
                           max_new_tokens=max_new, temperature=temperature, top_k=int(kw.pop("top_k", 0) or 0),
                           top_p=float(kw.pop("top_p", 1.0) or 1.0), generator=generator,
                           eos_token_id=self.eot_token_id, stop=stop)
            new = [t for t in seq[0, n_ctx:].tolist() if t != self.eot_token_id]
            text = self.tok_decode(new)
            for u in until:
                text = text.split(u)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


# ------------------------------------------------------------------------------------------------ the verb
def _settings(section: Any) -> dict[str, Any]:
    """What shapes the results besides the weights and the task files (the task folder's path is not identity: its
    files are, through :func:`_tasks_digest`)."""
    import lm_eval

    return {"tasks": list(section.tasks), "limit": section.limit, "num_fewshot": section.num_fewshot,
            "seed": section.seed, "lm_eval": getattr(lm_eval, "__version__", None)}


def _weights_digest(checkpoint: Path) -> str | None:
    """The student's identity by content: sha256 over the checkpoint manifest's entries for its weights and config
    (a student retrained into the same folder and step has another digest); None without a manifest."""
    try:
        files = json.loads((Path(checkpoint) / MANIFEST).read_text(encoding="utf-8"))["files"]
        entries = {k: files[k]["sha256"] for k in ("unit.safetensors", "config.yaml")}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def student_harness(run_dir: Path, checkpoint: Path, section: Any) -> dict[str, Any] | None:
    """The stored results of one student (``{run_dir}/harness/results.json``) when they were made from the same
    weights (by content), settings and task files as ``checkpoint`` and ``section`` would give now, else ``None``."""
    path = run_dir / HARNESS_DIR / "results.json"
    weights = _weights_digest(checkpoint)
    if weights is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    same = data.get("weights") == weights and data.get("settings") == _settings(section)
    return data if same and data.get("tasks_digest") == _tasks_digest(section) else None


def _tasks_digest(section: Any) -> str | None:
    """sha256 over the task files under ``include_path`` (a changed local task makes stored results stale)."""
    if not section.include_path:
        return None
    root = Path(section.include_path)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
        if p.is_file() and p.suffix in (".yaml", ".yml", ".jsonl", ".json", ".py"):
            h.update(p.relative_to(root if root.is_dir() else root.parent).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def evaluate_student(model: StudentLM, tokenizer: Any, section: Any, *, run_dir: Path, checkpoint: Path,
                     reuse: bool = True) -> dict[str, Any]:
    """The harness on one student; results written to ``{run_dir}/harness/results.json`` (atomically) and returned
    (``summary``: task -> metric -> value). Stored results of the same weights, settings and task files are reused."""
    from conceptlm.harness.evaluate import evaluate, summarize, write_results

    if reuse:
        stored = student_harness(run_dir, checkpoint, section)
        if stored is not None:
            return {**stored, "reused": True}
    lm = CocomixLM(model=model, tokenizer=tokenizer, batch_size=section.batch_size, seed=section.seed)
    start = time.perf_counter()
    res = evaluate(lm, tasks=list(section.tasks), include_path=section.include_path or None, limit=section.limit,
                   num_fewshot=section.num_fewshot, seed=section.seed)
    seconds = time.perf_counter() - start
    extra = {"checkpoint": str(checkpoint), "weights": _weights_digest(checkpoint), "settings": _settings(section),
             "tasks_digest": _tasks_digest(section), "seconds": seconds, "model": MODEL_NAME}
    write_results(run_dir / HARNESS_DIR / "results.json", res, extra=extra)
    return {**extra, "summary": summarize(res), "reused": False}


def evaluate_students(cfg: Any, checkpoint: str | None = None) -> dict[str, dict[str, Any]]:
    """The tasks of ``harness.tasks`` on every trained student (or the one of ``checkpoint``): student run name ->
    ``{"summary": task -> metric -> value, "checkpoint", "seconds", "reused"}``; stored results of the same
    weights (by content), settings and task files are reused."""
    from conceptlm.cocomix.hub import student_checkpoints
    from conceptlm.cocomix.labels import compute_device
    from conceptlm.cocomix.student import load_student

    section = cfg.harness
    students, tokenizer = student_checkpoints(cfg, checkpoint)
    device = compute_device()
    results: dict[str, Any] = {}
    for name, sub, ckpt in students:
        stored = student_harness(Path(sub.run_dir), ckpt, section)
        if stored is None:
            model = load_student(sub, ckpt).to(device)
            stored = evaluate_student(model, tokenizer, section, run_dir=Path(sub.run_dir), checkpoint=ckpt,
                                      reuse=False)
        else:
            stored = {**stored, "reused": True}
        results[name] = {k: stored.get(k) for k in ("summary", "checkpoint", "seconds", "reused")}
    return results


def eval_harness(cfg: Any, *, checkpoint: str | None = None, output: str | None = None) -> dict[str, Any]:
    """``conceptlm cocomix eval-harness``: the tasks of ``harness.tasks`` on every trained student (or the one of
    ``--checkpoint``); the per-student results go to ``{student run}/harness/results.json``, the summary (task ->
    metric -> value per student) to ``--output`` or ``{run_dir}/harness.json``."""
    from conceptlm.cocomix.identity import log_to_stderr

    section = cfg.harness
    if not section.tasks:
        raise ConfigError("name the tasks: harness.tasks=[task,...] (and harness.include_path=DIR for local ones)",
                          field="harness.tasks")
    log_to_stderr()
    results = evaluate_students(cfg, checkpoint)
    if not results:
        raise ConfigError(f"no student of {Path(cfg.run_dir) / 'students'} has a checkpoint; run the pipeline first",
                          field="pipeline.arms")
    summary = {"tasks": list(section.tasks), "settings": _settings(section), "students": results}
    path = Path(output) if output is not None else Path(cfg.run_dir) / HARNESS_FILE
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    return {**summary, "output": str(path)}
