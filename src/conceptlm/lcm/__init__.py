"""Large Concept Model (arXiv 2412.08821): language modeling over sequences of sentence embeddings.

Documents are segmented into sentences, each sentence is embedded by a frozen encoder (the "concept"), a model
predicts the next concept, and a decoder turns concepts back into text.

Module map (this package imports nothing on its own):

- ``config.py``: every LCM setting, one schema file (sections with ``validate()``, stage configs, ``LCMConfig``);
- ``recipe.py``: the ``conceptlm lcm`` verbs (prepare, train, train-decoder, eval-decoder, generate, evaluate,
  cost);
- ``data/``: documents -> sentence vectors: ``documents``, ``segment``, ``encoders``, ``prepare``, ``store``
  (the prepared folder), ``normalizer``;
- ``sequence.py``: what the variants share: document chunks and batches, the normalized model base, scored
  positions, the teacher-forced (Table 3) metrics as a unit's ``eval_metrics``;
- ``variants/``: one module per LCM (model + training unit + next-sentence predictor): ``base``, ``two_tower``,
  ``one_tower``, ``quant``; ``variants/__init__`` maps ``lcm.model`` to its unit;
- ``rvq.py``: the residual vector quantizer (Quant-LCM); ``interleave.py``: the clean/noisy interleaving of the
  One-Tower and Quant-LCM sequences; ``diffusion/``: noise schedules, DDIM sampler, loss weighting;
- ``train.py``: the LCM training stage (data, normalizer fit, ``train_lcm``, ``load_lcm``);
- ``generate.py``: the one generation loop with the paper's stopping rules;
- ``decoders.py`` (interface, retrieval bank, loading), ``prefix_decoder.py`` (prefix LM), ``decoder_train.py``:
  concept vectors back to text;
- ``metrics.py``: the evaluation metrics (ℓ2, CA, PAR, MI, ROUGE-L, OVL-3, REP-4, AutoBLEU, fragility);
- ``cost.py``: every FLOPs / parameter count of the LCM (``conceptlm lcm cost``).
"""
