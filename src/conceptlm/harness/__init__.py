"""EleutherAI's lm-evaluation-harness (``lm_eval``, the optional extra ``conceptlm[harness]``) over conceptlm's
token-level models, offline on tasks defined over local files.

* :mod:`conceptlm.harness.evaluate`: run the harness on an LM (a registered name with its arguments, or an
  ``lm_eval`` ``LM`` instance), summarise its results into one number per task and metric, write them as JSON;
  the ``hf`` model's arguments for a conceptlm export (SFT / JEPA ``model/`` folders, LoRA adapters via ``peft=``,
  CoCoMix Hub-format folders via ``trust_remote_code``);
* :mod:`conceptlm.harness.tasks`: write an lm-eval task (YAML + JSONL) over local rows: multiple choice, rolling
  log-likelihood (perplexity) or generation;
* ``python -m conceptlm.harness ...``: the ``lm_eval`` command line with conceptlm's models registered
  (``--model conceptlm-cocomix``; see :mod:`conceptlm.cocomix.harness`).

A separate package rather than a module of :mod:`conceptlm.eval`: it is the one place that imports ``lm_eval``
(an optional dependency), and it serves several methods (the HF exports of SFT / JEPA, the CoCoMix students); the
method-specific LM wrappers live with their method (``cocomix/harness.py``). Nothing here is imported by the
training code.
"""
