"""An LCM in lm-evaluation-harness where it is meaningful: the model ``conceptlm-lcm`` (generation tasks) and the
``conceptlm lcm eval-harness`` verb.

:class:`LCMHarnessLM` answers ``generate_until`` the way ``conceptlm lcm generate generate.prompt=TEXT`` continues a
prompt: the request's text is split into sentences by the run's segmenter (``segment``), embedded by the run's
encoder (checked against the identity the model recorded), continued by the LCM for at most ``max_sentences``
sentences (``harness.max_sentences``, or a task's ``max_gen_sentences``; ``generate``'s stopping rules and sampling
settings otherwise), decoded by the configured decoder and joined with spaces; the text is cut at the first of the
task's ``until`` strings. Each request is generated on its own (row 0 of a batch of one), so its text does not
depend on the other requests and equals the ``generate`` verb's. A task's ``max_gen_toks`` is ignored (the LCM
generates sentences, not tokens); a prompt longer than the model's ``max_sentences`` keeps its last sentences.

``loglikelihood`` and ``loglikelihood_rolling`` (multiple-choice and perplexity tasks) raise
:class:`NoTokenLikelihood`: an LCM predicts sentence embeddings, so it assigns no probability to a string. A
multiple-choice score would need a likelihood of each choice's sentences under the LCM -- for a diffusion LCM the
(negative) denoising loss or an ELBO of the choice's embeddings given the context, for a Quant-LCM-D the
cross-entropy of the choice's residual codes, for a Base-LCM a Gaussian likelihood of its MSE -- or the decoder's
likelihood of the choice's tokens given the predicted vector. Those are not comparable across variants nor with
token-level models' ``acc``, and none is in the paper, so none is provided here.

Use it

* ``conceptlm lcm eval-harness --config CFG harness.tasks=[T] harness.include_path=DIR`` (``--checkpoint``: a
  checkpoint or a Hub-format export folder): results in ``{run_dir}/harness.json`` (``--output``), reused when the
  weights, encoder, decoder, settings and task files are the same;
* ``python -m conceptlm.harness --model conceptlm-lcm --model_args config=CFG,pretrained=FOLDER,max_sentences=4
  --tasks T --include_path DIR`` (``pretrained`` defaults to the run's newest checkpoint; without ``config`` the
  defaults of :class:`~conceptlm.lcm.config.LCMConfig` with the encoder and decoder the export recorded);
* from Python: ``LCMHarnessLM(run=load_run(cfg), cfg=cfg)`` and :func:`conceptlm.harness.evaluate.evaluate`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from conceptlm.core.artifact import Identity, file_sha256
from conceptlm.core.errors import ConceptLMError, ConfigError

try:
    import lm_eval.models  # noqa: F401  (the harness's own models, before ours: a non-empty registry skips them)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # one line from the CLI instead of a traceback
    raise ConfigError("lm-evaluation-harness is not installed: pip install 'conceptlm[harness]'",
                      field="harness") from None

__all__ = ["LCMHarnessLM", "NoTokenLikelihood", "eval_harness", "harness_identity", "MODEL_NAME", "HARNESS_FILE"]

log = logging.getLogger(__name__)

MODEL_NAME = "conceptlm-lcm"
HARNESS_FILE = "harness.json"
"""The run folder's results of the ``eval-harness`` verb."""
_NO_LIKELIHOOD = ("an LCM has no token likelihood: it predicts sentence embeddings, so {what} tasks (multiple choice, "
                  "perplexity) cannot be scored; use generation tasks (output_type: generate_until). A choice score "
                  "would need a likelihood of the choice's sentences under the LCM (e.g. a diffusion ELBO) or the "
                  "decoder's likelihood of the choice given the predicted vector; see conceptlm.lcm.harness")


class NoTokenLikelihood(ConceptLMError, NotImplementedError):
    """A log-likelihood request to an LCM (module docstring)."""


@register_model(MODEL_NAME)
class LCMHarnessLM(LM):
    """lm-eval model over an LCM run (module docstring).

    Args:
        pretrained: a checkpoint or Hub-format export folder (default: the newest checkpoint of the config's run).
        config: an LCM config YAML (segmenter, encoder, decoder, generation settings); default ``LCMConfig()``
            with, for an export folder, the encoder and decoder it recorded.
        decoder: a decoder folder (overrides ``decoder.path``).
        max_sentences: sentences generated per request (default ``harness.max_sentences``, else
            ``generate.max_new_sentences``).
        run / cfg: an already loaded run (:func:`conceptlm.lcm.recipe.load_run`) and its config, instead of the above.
    """

    def __init__(self, pretrained: str | None = None, *, config: str | None = None, decoder: str | None = None,
                 max_sentences: int | str | None = None, run: Any = None, cfg: Any = None, **_ignored: Any) -> None:
        super().__init__()
        from conceptlm.lcm.data.segment import get_segmenter
        from conceptlm.lcm.recipe import _check_sampler, _eot, load_run

        if run is None:
            cfg = _config(pretrained, config, decoder)
            run = load_run(cfg, pretrained)
        elif cfg is None:
            raise ConfigError("pass cfg= (the LCMConfig) with run=", field="model_args")
        _check_sampler(cfg, run.model)
        self.run, self.cfg = run, cfg
        self.segmenter = get_segmenter(cfg.segment)
        self.eot = _eot(cfg, run.encoder)
        default = cfg.harness.max_sentences or cfg.generate.max_new_sentences
        self.max_sentences = int(max_sentences) if max_sentences not in (None, "") else int(default)

    # ------------------------------------------------------------------------------------------- no likelihood
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        raise NoTokenLikelihood(_NO_LIKELIHOOD.format(what="loglikelihood"))

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
        raise NoTokenLikelihood(_NO_LIKELIHOOD.format(what="loglikelihood_rolling"))

    # ------------------------------------------------------------------------------------------- generation
    def continue_text(self, text: str, max_sentences: int) -> str:
        """``text`` -> sentences -> vectors -> at most ``max_sentences`` generated sentences -> decoded text."""
        from conceptlm.lcm.generate import generate

        sentences = self.segmenter.split(text)
        if not sentences:
            log.warning("a harness prompt has no sentence (%r): empty continuation", text[:60])
            return ""
        sentences = sentences[-(self.run.model.cfg.max_sentences - 1):]
        options = self.cfg.generate.options()
        options.max_new_sentences = max_sentences
        res = generate(self.run.model, [self.run.encoder.encode(sentences)], eot=self.eot, options=options,
                       decode=self.run.decode)[0]
        return res.text or ""

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            kw = dict(gen_kwargs or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            text = self.continue_text(context, int(kw.get("max_gen_sentences") or self.max_sentences))
            for u in until:
                if u:
                    text = text.split(u)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def _config(pretrained: str | None, config: str | None, decoder: str | None):
    """The LCM config of the model arguments: ``config`` (or the defaults, with an export folder's recorded encoder
    and decoder), ``decoder`` overriding ``decoder.path``."""
    from conceptlm.core.config import load_config
    from conceptlm.lcm.config import LCMConfig

    overrides = []
    if config is None and pretrained is not None and (Path(pretrained) / "config.json").is_file():
        meta = json.loads((Path(pretrained) / "config.json").read_text(encoding="utf-8")).get("conceptlm") or {}
        if (meta.get("encoder") or {}).get("name"):
            overrides.append(f"encoder.name={meta['encoder']['name']}")
        if decoder is None and (meta.get("decoder") or {}).get("path"):
            decoder = meta["decoder"]["path"]
    if config is None and pretrained is None:
        raise ConfigError("conceptlm-lcm needs config=<LCM config YAML> or pretrained=<checkpoint or export folder>",
                          field="model_args")
    if decoder is not None:
        overrides.append(f"decoder.path={decoder}")
    return load_config(LCMConfig, config, overrides)


# ------------------------------------------------------------------------------------------------ the verb
def _weights_sha256(folder: Path) -> str:
    """sha256 of the weights file of a checkpoint (``unit.safetensors``) or export (``model.safetensors``), from the
    folder's manifest when it lists it."""
    for name, manifest in (("unit.safetensors", "manifest.json"), ("model.safetensors", "artifact.json")):
        if (folder / name).is_file():
            try:
                return json.loads((folder / manifest).read_text(encoding="utf-8"))["files"][name]["sha256"]
            except (OSError, ValueError, KeyError, TypeError):
                return file_sha256(folder / name)
    raise ConfigError(f"{folder}: no weights (unit.safetensors or model.safetensors)", field="checkpoint")


def harness_identity(cfg: Any, run: Any) -> Identity:
    """What the results depend on: the weights, the encoder and decoder (by content), the harness, segmenter and
    generation settings, and the task files."""
    import lm_eval

    from conceptlm.harness.tasks import tasks_digest
    from conceptlm.lcm.data.encoders import identity_fingerprint
    from conceptlm.lcm.decoders import decoder_manifest

    h = cfg.harness
    decoder = decoder_manifest(cfg.decoder_dir) if run.decoder is not None else None
    settings = {"tasks": list(h.tasks), "limit": h.limit, "num_fewshot": h.num_fewshot, "seed": h.seed,
                "max_sentences": h.max_sentences, "generate": dataclasses.asdict(cfg.generate.options()),
                "segment": dataclasses.asdict(cfg.segment), "end_of_text": cfg.prepare.end_of_text,
                "end_of_text_sentence": cfg.prepare.end_of_text_sentence,
                "lm_eval": getattr(lm_eval, "__version__", None)}
    return Identity(kind="lcm.harness", settings=settings,
                    inputs={"weights": _weights_sha256(run.checkpoint), "encoder": identity_fingerprint(run.encoder),
                            "decoder": (decoder or {}).get("fingerprint") or str(cfg.decoder_dir),
                            "tasks": tasks_digest(h.include_path or None)})


def eval_harness(cfg: Any, *, checkpoint: str | None = None, output: str | None = None) -> dict[str, Any]:
    """``conceptlm lcm eval-harness``: the generation tasks of ``harness.tasks`` on the run's LCM (newest checkpoint,
    or ``--checkpoint``: a checkpoint or export folder); results to ``--output`` or ``{run_dir}/harness.json``,
    reused when made from the same :func:`harness_identity`."""
    from conceptlm.harness.evaluate import evaluate, summarize, write_results
    from conceptlm.lcm.recipe import load_run

    h = cfg.harness
    if not h.tasks:
        raise ConfigError("name the tasks: harness.tasks=[task,...] (and harness.include_path=DIR for local ones)",
                          field="harness.tasks")
    run = load_run(cfg, checkpoint)
    identity = harness_identity(cfg, run)
    path = Path(output) if output is not None else cfg.run_dir / HARNESS_FILE
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = {}
        if stored.get("fingerprint") == identity.fingerprint:
            log.info("%s: reused (same weights, encoder, decoder, settings and task files)", path)
            return {k: stored.get(k) for k in ("summary", "checkpoint", "seconds")} | {"output": str(path),
                                                                                      "reused": True}
    lm = LCMHarnessLM(run=run, cfg=cfg)
    start = time.perf_counter()
    res = evaluate(lm, tasks=list(h.tasks), include_path=h.include_path or None, limit=h.limit,
                   num_fewshot=h.num_fewshot, seed=h.seed)
    extra = {"checkpoint": str(run.checkpoint), "model": MODEL_NAME, "seconds": time.perf_counter() - start,
             "fingerprint": identity.fingerprint, "identity": identity.as_dict()}
    write_results(path, res, extra=extra)
    return {"summary": summarize(res), "checkpoint": str(run.checkpoint), "seconds": extra["seconds"],
            "output": str(path), "reused": False}
