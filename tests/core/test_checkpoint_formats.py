"""HF units: the native checkpoint plus the ``from_pretrained`` export."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conceptlm.core import checkpoint as ckpt_lib
from conceptlm.core.config import load_config
from conceptlm.sft.config import SFTConfig
from conceptlm.sft.recipe import train
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(tmp_path, name, train_file, **kw):
    cfg = load_config(SFTConfig, None, tiny_overrides(tmp_path, train_file, **{"run.name": name,
                                                                               "schedule.kind": "constant", **kw}))
    return train(cfg)


def test_hf_unit_checkpoint_holds_native_state_export_and_tokenizer(tmp_path, chat_files):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = run(tmp_path, "n", chat_files[0], **{"train.max_steps": 2})
    ckpt = res.checkpoint
    native = load_file(str(ckpt / ckpt_lib.UNIT_FILE))
    exported = load_file(str(ckpt / "model" / "model.safetensors"))
    assert all(k.startswith("model.") for k in native)
    for k, v in exported.items():  # the export holds the same tensors (tied head dropped in both)
        assert torch.equal(native["model." + k], v)
    assert (ckpt / "artifacts" / "tokenizer" / "tokenizer.json").is_file()
    assert ckpt_lib.verify_checkpoint(ckpt) is None
    model = AutoModelForCausalLM.from_pretrained(ckpt / "model")
    tok = AutoTokenizer.from_pretrained(ckpt / "model")
    assert model.config.vocab_size >= len(tok)
