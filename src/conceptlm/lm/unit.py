"""The base of units that train one Hugging Face causal LM (``self.model``): their export is the model's
``save_pretrained`` folder plus the tokenizer, so a checkpoint's ``model/`` loads with ``from_pretrained``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from conceptlm.core.checkpoint import tied_parameter_names
from conceptlm.core.unit import TrainUnit

__all__ = ["HFModelUnit"]


class HFModelUnit(TrainUnit):
    """A unit around ``self.model`` (an HF ``PreTrainedModel`` or a ``peft.PeftModel``).

    ``export`` writes ``save_pretrained`` (the full model, or the LoRA adapter whose config names its base) and the
    ``tokenizer`` artefact into the checkpoint's ``model/`` folder.
    """

    model: torch.nn.Module

    def export(self, directory: Path, state_dict: dict[str, torch.Tensor], artifacts: dict[str, Any]) -> bool:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        tied = tied_parameter_names(self.model)  # gathered (FSDP) state dicts hold tied weights as separate copies
        sd = {k[len("model."):]: v for k, v in state_dict.items()
              if k.startswith("model.") and k[len("model."):] not in tied}
        self.model.save_pretrained(directory, state_dict=sd, safe_serialization=True)
        tokenizer = artifacts.get("tokenizer")
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return True

