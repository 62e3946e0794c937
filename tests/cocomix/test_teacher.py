"""Teacher: truncated hidden states (Llama and GPT-2), loading from HF / checkpoint / run folders, tiny teacher."""

from __future__ import annotations

import pytest
import torch
import transformers

from conceptlm.cocomix.config import CorpusSection, TeacherSection
from conceptlm.cocomix.teacher import (
    hidden_at_layer,
    load_teacher,
    teacher_blocks,
    teacher_identity,
    train_tiny_teacher,
)
from conceptlm.core.distributed import DistInfo
from conceptlm.core.errors import ConfigError
from conceptlm.core.hf import build_tiny_model, save_model
from conceptlm.core.tokenizer import train_bpe_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _info() -> DistInfo:
    return DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hidden_at_layer_equals_output_hidden_states_without_running_later_blocks(arch):
    model = build_tiny_model(arch, 60, hidden_size=16, num_layers=3, num_heads=2, seed=0).eval()
    ids = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = model(ids, output_hidden_states=True).hidden_states
    blocks = teacher_blocks(model)
    before = [len(b._forward_hooks) for b in blocks]
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    for layer in (0, 1):
        calls.clear()
        got = hidden_at_layer(model, ids, layer)
        torch.testing.assert_close(got, ref[layer + 1], rtol=0, atol=0)
        assert calls == list(range(layer + 1))  # blocks above `layer` never ran
    for h in handles:
        h.remove()
    assert [len(b._forward_hooks) for b in blocks] == before  # the stopping hook is removed
    # the last block: its own output (HF reports it after the final norm)
    last = hidden_at_layer(model, ids, 2)
    norm = model.model.norm if arch == "llama" else model.transformer.ln_f
    torch.testing.assert_close(norm(last), ref[3])
    with pytest.raises(ValueError, match="not a block"):
        hidden_at_layer(model, ids, 3)
    # gradients flow when enabled
    model.requires_grad_(True)
    hidden_at_layer(model, ids, 0).sum().backward()
    assert any(p.grad is not None for p in blocks[0].parameters())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_torch_thread):
    """A tiny teacher trained on the shared loop (12 steps, checkpoints at 6 and 12)."""
    root = tmp_path_factory.mktemp("teacher")
    corpus = CorpusSection(n_documents=80, window=24, seed=1)
    sec = TeacherSection(hidden_size=32, num_heads=2, num_layers=2, vocab_size=320, steps=12, batch_size=8,
                         save_every=6, warmup_steps=2)
    export = train_tiny_teacher(corpus, sec, root / "teacher", _info(), progress=False)
    return corpus, sec, root / "teacher", export


def test_tiny_teacher_exports_an_hf_model_and_reuses_finished_runs(tiny_run):
    corpus, sec, run, export = tiny_run
    assert export.name == "model" and export.parent.name == "step_00000012"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(export))
    assert isinstance(model, transformers.LlamaForCausalLM) and model.config.hidden_size == 32
    tok = transformers.AutoTokenizer.from_pretrained(str(export))
    assert len(tok) == model.config.vocab_size
    rows = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert rows  # trained on the loop (metrics written)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert train_tiny_teacher(corpus, sec, run, _info(), progress=False) == export  # finished: reused
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_tiny_teacher_resumes_after_a_stop_to_the_same_weights(tiny_run, tmp_path):
    import shutil

    from safetensors.torch import load_file

    corpus, sec, run, export = tiny_run
    copy = tmp_path / "teacher"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000012")  # stopped after the step-6 checkpoint
    resumed = train_tiny_teacher(corpus, sec, copy, _info(), progress=False)
    assert resumed.parent.name == "step_00000012"
    a, b = load_file(str(export / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_teacher_from_checkpoint_run_and_hf_folders(tiny_run, tmp_path):
    _, sec, run, export = tiny_run
    for path in (export.parent, run, export):
        model, tok = load_teacher(TeacherSection(path=str(path), layer=1))
        assert not model.training and all(not p.requires_grad and p.dtype == torch.float32
                                          for p in model.parameters())
        assert tok.eos_token_id is not None
    ident = teacher_identity(str(run), 1)
    assert ident["num_layers"] == 2 and ident["hidden_size"] == 32 and ident["layer"] == 1
    assert ident == teacher_identity(str(run), 1)
    with pytest.raises(ConfigError, match="teacher.layer"):
        load_teacher(TeacherSection(path=str(export), layer=2))
    with pytest.raises(ConfigError, match="no teacher path"):
        load_teacher(TeacherSection())
    # a GPT-2 model folder saved by the user
    tok = train_bpe_tokenizer(["a b c d e"] * 20, vocab_size=300)
    gpt2 = build_tiny_model("gpt2", len(tok), hidden_size=16, num_layers=2, num_heads=2, seed=0)
    save_model(gpt2, tmp_path / "gpt2", tok)
    model, _ = load_teacher(TeacherSection(path=str(tmp_path / "gpt2"), layer=0))
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(hidden_at_layer(model, ids, 0), model(ids, output_hidden_states=True).hidden_states[1])
