"""A LoRA adapter trained on a local base whose vocabulary the run grew (a pad token distinct from EOS, as for
SmolLM2) reloads: the base is resized to the adapter's saved embedding rows before the adapter is applied."""

from __future__ import annotations

import torch

from conceptlm.core import hf


def test_adapter_over_a_resized_base_reloads_with_identical_logits(tmp_path):
    base = hf.build_tiny_model("llama", 300, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    hf.save_model(base, tmp_path / "base")
    model = hf.load_causal_lm(tmp_path / "base")
    hf.resize_token_embeddings(model, 301, init="mean")  # what ensure_pad_token does for such a base
    model = hf.apply_lora(model, r=2, alpha=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a trained adapter (lora_B starts at zero)
    hf.save_model(model, tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 300, 7]])  # 300: the added token
    with torch.no_grad():
        want = model(input_ids=ids).logits
        again = hf.load_causal_lm(tmp_path / "adapter")
        got = again(input_ids=ids).logits
    assert got.shape[-1] == 301
    assert torch.allclose(got, want, atol=1e-6)
