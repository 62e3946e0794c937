"""The document -> sentence-vector pipeline of the LCM (``conceptlm lcm prepare``).

- :mod:`~conceptlm.lcm.data.documents`: document sources (built-in generator, ``.txt`` / ``.jsonl``, instructions);
- :mod:`~conceptlm.lcm.data.segment`: sentence segmenters (rule-based, spaCy, SaT) with the length cap;
- :mod:`~conceptlm.lcm.data.encoders`: frozen sentence encoders (MiniLM, sentence-transformers folders, SONAR);
- :mod:`~conceptlm.lcm.data.prepare`: segment, embed and store documents as Parquet shards (resumable);
- :mod:`~conceptlm.lcm.data.store`: the prepared folder's format and its dataset (:class:`EmbeddedDocuments`);
- :mod:`~conceptlm.lcm.data.normalizer`: the robust embedding normalizer fitted on the training split.
"""
