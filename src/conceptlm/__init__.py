"""conceptlm: language modeling beyond next-token prediction.

Three methods on one training loop:
- ``conceptlm.jepa``: LLM-JEPA (arXiv 2509.14252)
- ``conceptlm.cocomix``: CoCoMix (arXiv 2502.08524)
- ``conceptlm.lcm``: Large Concept Model (arXiv 2412.08821)

``conceptlm.sft`` is the method-independent baseline: supervised fine-tuning / from-scratch
next-token training of Hugging Face causal LMs on chat JSONL.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
