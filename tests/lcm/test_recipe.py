"""The ``conceptlm lcm`` verbs end to end on one config: prepare -> train-decoder -> train -> generate -> evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conceptlm.cli import main
from conceptlm.core.config import load_config
from conceptlm.core.errors import CheckpointError, ConfigError
from conceptlm.lcm.config import LCMConfig, decoder_config, lcm_train_config, prepare_config
from conceptlm.lcm.decoder_train import StoredVectorsEncoder
from conceptlm.lcm.recipe import evaluate, generate, prepare, train, train_decoder

REPO = Path(__file__).resolve().parents[2]


def _overrides(tmp_path: Path) -> list[str]:
    return [f"run.out_dir={tmp_path}", "run.name=lcm", f"prepare.out_dir={tmp_path}/data", "docs.n_documents=40",
            "prepare.val_fraction=0.2", "prepare.shard_size=16", "train.max_steps=30", "train.eval_every=0",
            "train.micro_batch_size=8", "schedule.warmup_steps=3", "evaluate.documents=6",
            "evaluate.generate_documents=3", "evaluate.fragility_sentences=4", "decoder_train.eval_sentences=8",
            "decoder_train.decode_eval=8",
            "generate.documents=2", "train.progress=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lcm_recipe")
    cfg = load_config(LCMConfig, REPO / "configs/lcm/tiny_cpu.yaml", _overrides(tmp))
    summary = prepare(cfg)
    dec = train_decoder(cfg)
    res = train(cfg)
    return cfg, summary, dec, res


def test_stage_configs_share_the_run_sections(tmp_path):
    cfg = load_config(LCMConfig, REPO / "configs/lcm/tiny_cpu.yaml", _overrides(tmp_path))
    p = prepare_config(cfg)
    assert p.docs is cfg.docs and p.encoder is cfg.encoder and p.run == cfg.run
    d = decoder_config(cfg)
    assert d.run_dir == cfg.run_dir / "decoder" and d.decoder_train is cfg.decoder_train
    with pytest.raises(ConfigError, match="lcm_data.source.*conceptlm lcm prepare"):
        lcm_train_config(cfg)  # nothing prepared yet: a clear error naming the verb to run
    synthetic = load_config(LCMConfig, None, [f"run.out_dir={tmp_path}", "lcm_data.source=synthetic"])
    assert lcm_train_config(synthetic).lcm_data.source == "synthetic"


def test_generate_section_errors_name_the_field():
    with pytest.raises(ConfigError, match="generate.max_new_sentences"):
        load_config(LCMConfig, None, ["generate.max_new_sentences=0"])
    with pytest.raises(ConfigError, match="generate.temperature"):
        load_config(LCMConfig, None, ["generate.temperature=-1"])


def test_verbs_end_to_end(trained, capsys):
    cfg, summary, dec, res = trained
    assert summary["n_documents"] == 40 and summary["n_validation_documents"] > 0
    assert dec.checkpoint is not None and Path(dec.checkpoint).is_dir()
    assert res.step == 30 and (cfg.run_dir / "checkpoints").is_dir()

    out = generate(cfg)
    printed = capsys.readouterr().out
    assert out["documents"] == 2 and "continuation (" in printed and "reference:" in printed
    saved = json.loads(Path(out["output"]).read_text())
    for doc in saved["documents"]:
        assert len(doc["prompt"]) == cfg.generate.prompt_sentences
        assert doc["new_sentences"] == len(doc["continuation"]) >= 0
        assert doc["stop"] in ("eot", "repetition", "max_new_sentences", "max_sentences")
        # retrieval decoding: every generated sentence is a sentence of the training documents
        assert all(isinstance(s, str) and s for s in doc["continuation"])

    ev = evaluate(cfg)
    tf = ev["teacher_forced"]
    assert set(tf) == {"l2", "l2_prev", "cos", "ca", "par", "l2_r"}
    assert 0.0 <= tf["ca"] <= 1.0 and -1.0 <= tf["cos"] <= 1.0 and tf["l2"] > 0 and tf["l2_r"] > 0
    gen = ev["generation"]
    assert gen["documents"] == 3 and 0.0 <= gen["rouge_l"] <= 1.0 and 0.0 <= gen["rep4"] <= 1.0
    assert json.loads(Path(ev["output"]).read_text())["teacher_forced"] == tf
    assert ev["fragility"]["sentences"] == 4 and -100.0 <= ev["fragility"]["mean"] <= 0.0


def test_generate_from_a_prompt_text(trained, capsys):
    cfg, *_ = trained
    import dataclasses

    text = "Anna lived in a small house in Riverton. Every morning she walked to the harbor with her dog."
    cfg2 = dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, prompt=text))
    out = generate(cfg2, output=str(cfg.run_dir / "prompt.json"))
    doc = json.loads(Path(out["output"]).read_text())["documents"][0]
    assert doc["prompt"] == ["Anna lived in a small house in Riverton.",
                             "Every morning she walked to the harbor with her dog."]
    assert doc["reference"] is None and "continuation (" in capsys.readouterr().out
    too_long = " ".join(f"Sentence number {i} is here." for i in range(cfg.lcm.max_sentences + 2))
    cfg3 = dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, prompt=too_long))
    with pytest.raises(ConfigError, match="generate.prompt.*max_sentences"):
        generate(cfg3)


def test_generate_without_a_run_or_decoder_says_what_to_run(tmp_path, trained):
    cfg = load_config(LCMConfig, REPO / "configs/lcm/tiny_cpu.yaml", _overrides(tmp_path))
    with pytest.raises(CheckpointError, match="conceptlm lcm train"):
        generate(cfg)
    trained_cfg = trained[0]
    with pytest.raises(ConfigError, match="train-decoder"):
        generate(load_config(LCMConfig, REPO / "configs/lcm/tiny_cpu.yaml",
                             _overrides(tmp_path) + [f"decoder.path={tmp_path}/nowhere"]),
                 checkpoint=str(trained_cfg.run_dir / "checkpoints" / "step_00000030"))


def test_cli_lists_the_lcm_verbs(capsys):
    with pytest.raises(SystemExit):
        main(["lcm", "--help"])
    text = capsys.readouterr().out
    for verb in ("prepare", "train", "train-decoder", "eval-decoder", "generate", "evaluate"):
        assert verb in text


class _CountingEncoder:
    name, dim = "fake", 3

    def __init__(self):
        self.calls: list[list[str]] = []

    def identity(self) -> dict:
        return {"name": "fake", "dim": 3}

    def encode(self, sentences, batch_size=None, progress=False):
        self.calls.append(list(sentences))
        return torch.tensor([[float(len(s)), 0.0, 1.0] for s in sentences])


def test_stored_vectors_are_reused_and_only_new_sentences_encoded():
    inner = _CountingEncoder()
    enc = StoredVectorsEncoder(inner, {"known.": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16)})
    out = enc.encode(["known.", "new one.", "known.", "new one."])
    assert inner.calls == [["new one."]]  # each unknown sentence encoded once
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0, 3.0], [8.0, 0.0, 1.0]] * 2))
    assert enc.identity() == inner.identity() and enc.dim == 3 and enc.encode([]).shape == (0, 3)


def test_retrieval_bank_takes_the_prepared_vectors(trained):
    from conceptlm.lcm.data.store import EmbeddedDocuments
    from conceptlm.lcm.decoders import load_decoder

    cfg, *_ = trained
    bank = load_decoder(cfg.decoder_dir)
    docs = EmbeddedDocuments(cfg.data_dir, "all")
    stored = {}
    for i in range(len(docs)):
        for sentence, v in zip(docs[i]["sentences"], docs[i]["vectors"]):
            stored.setdefault(sentence, v)
    rows = [j for j, s_ in enumerate(bank.sentences) if s_ in stored][:20]
    assert rows
    want = torch.nn.functional.normalize(torch.stack([stored[bank.sentences[j]] for j in rows]), dim=-1)
    torch.testing.assert_close(bank.embeddings[rows], want)


# ------------------------------------------------------------------------------------------------ variants
VARIANTS = {
    "two_tower": ["lcm.model=two_tower", "lcm.n_denoiser_layers=1", "lcm.diffusion.num_train_steps=20",
                  "generate.diffusion.inference_steps=4"],
    "one_tower": ["lcm.model=one_tower", "lcm.positions=learned", "lcm.diffusion.num_train_steps=20",
                  "generate.diffusion.inference_steps=4"],
    "quant_d": ["lcm.model=quant_d", "lcm.quant.n_codebooks=3", "lcm.quant.codebook_size=16",
                "lcm.quant.fit_samples=200", "lcm.quant.fit_iters=3"],
    "quant_c": ["lcm.model=quant_c", "lcm.quant.n_codebooks=3", "lcm.quant.codebook_size=16",
                "lcm.quant.fit_samples=200", "lcm.quant.fit_iters=3"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_trains_generates_and_evaluates(trained, variant, capsys):
    """The same prepared documents and decoder, another ``lcm.model``: train -> generate -> evaluate."""
    base_cfg = trained[0]
    over = _overrides(base_cfg.run_dir.parent) + [f"run.name={variant}", f"decoder.path={base_cfg.decoder_dir}",
                                                   "train.max_steps=10", "evaluate.fragility_sentences=0",
                                                   *VARIANTS[variant]]
    cfg = load_config(LCMConfig, REPO / "configs/lcm/tiny_cpu.yaml", over)
    res = train(cfg)
    assert res.step == 10
    out = generate(cfg)
    assert out["documents"] == 2 and "continuation (" in capsys.readouterr().out
    ev = evaluate(cfg)
    tf = ev["teacher_forced"]
    assert set(tf) >= {"l2", "l2_prev", "cos", "ca", "par", "l2_r"} and tf["l2"] > 0
    assert ev["generation"]["documents"] == 3
    if variant.endswith("tower"):  # more sampler steps than noise levels: a one-line error naming the field
        too_many = load_config(LCMConfig, REPO / "configs/lcm/tiny_cpu.yaml",
                               over + ["generate.diffusion.inference_steps=21"])
        with pytest.raises(ConfigError, match="generate.diffusion.inference_steps"):
            generate(too_many)


def test_instruction_data_trains_on_the_answer_and_is_scored_on_it(tmp_path):
    """docs.generated_task=summary: source sentences, the [MODEL]: marker, the answer; only the answer is a
    target, and evaluation answers each validation source."""
    from conceptlm.lcm.data.store import EmbeddedDocuments
    from conceptlm.lcm.sequence import DocumentChunks, collate_documents

    over = _overrides(tmp_path) + ["docs.generated_task=summary", "train.max_steps=8", "evaluate.fragility_sentences=0",
                                   "evaluate.round_trip=false"]
    cfg = load_config(LCMConfig, REPO / "configs/lcm/tiny_cpu.yaml", over)
    prepare(cfg)
    docs = EmbeddedDocuments(cfg.data_dir, "train")
    doc = docs[0]
    k = doc["sentences"].index("[MODEL]:")
    assert doc["loss_from"] == k + 1 and doc["sentences"][-1] == "End of text."
    assert doc["sentences"][k + 1] == doc["sentences"][0]  # the summary starts with the lead sentence
    batch = collate_documents([DocumentChunks(docs, max_sentences=32)[i] for i in range(2)])
    assert batch["loss_mask"][0].nonzero().min() == k + 1 and batch["loss_mask"].sum() < batch["mask"].sum()
    train_decoder(cfg)
    train(cfg)
    ev = evaluate(cfg)
    gen = ev["generation"]
    assert gen["documents"] == 3 and 0.0 <= gen["rouge_l"] <= 1.0 and "[MODEL]:" not in gen["example"]["prompt"]


def test_cost_verb_writes_the_table_and_plot(tmp_path, capsys):
    main(["lcm", "cost", "--config", str(REPO / "configs/lcm/tiny_cpu.yaml"), f"run.out_dir={tmp_path}",
          "cost.lcm=two_tower_1.6b"])
    printed = capsys.readouterr().out
    assert "Break-even sentence length" in printed
    out = tmp_path / "lcm_tiny" / "cost"
    assert (out / "cost.md").is_file() and (out / "cost.png").is_file()
