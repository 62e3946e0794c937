"""Interpretability and steering of a CoCoMix student: concept descriptions (streaming top-N against brute force,
recomputed exactly when the SAE changes), per-token concept predictions, steered generation and its measured
effect, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from conceptlm.cocomix.config import CocomixConfig, StudentSection
from conceptlm.cocomix.corpus import build_corpus
from conceptlm.cocomix.descriptions import (
    CONCEPTS_FILE,
    StreamingTopN,
    concept_activation,
    sae_activations,
    token_frequency,
)
from conceptlm.cocomix.generate import generate
from conceptlm.cocomix.interpret import concept_logits, concepts, explain, steer
from conceptlm.cocomix.labels import resolve_teacher
from conceptlm.cocomix.model import Steering, StudentLM, sae_layer_norm
from conceptlm.cocomix.pipeline import pipeline
from conceptlm.cocomix.sae import TopKSAE, load_sae, save_sae
from conceptlm.cocomix.teacher import hidden_at_layer, load_teacher
from conceptlm.core.config import load_config
from conceptlm.core.errors import ConceptLMError, ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = "configs/cocomix/tiny_cpu.yaml"
TINY = [
    "corpus.n_documents=120", "corpus.window=24", "teacher.hidden_size=32", "teacher.num_layers=2",
    "teacher.steps=8", "teacher.warmup_steps=1", "teacher.vocab_size=300", "sae.n_latents=32", "sae.k=4",
    "sae.steps=4", "sae.batch_size=8", "student.d_model=32", "student.n_layers=2", "student.max_len=24",
    "student.n_concepts=32", "student.concept_k=4", "train.max_steps=4", "train.eval_every=2",
    "train.micro_batch_size=8", "schedule.warmup_steps=1", "train.progress=false", "labels.progress=false",
    "pipeline.arms=[cocomix]", "interpret.progress=false", "interpret.top_tokens=5", "interpret.prompt_tokens=10",
    "interpret.max_new_tokens=8",
]


def _cfg(out_dir, *extra: str) -> CocomixConfig:
    return load_config(CocomixConfig, CONFIG, [f"run.out_dir={out_dir}", *TINY, *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_torch_thread):
    """One tiny pipeline run (teacher, SAE, labels, a CoCoMix student), shared by the tests of this file."""
    root = tmp_path_factory.mktemp("interpret")
    cfg = _cfg(root)
    pipeline(cfg)
    return cfg


def _teacher_and_sae(cfg):
    sae = load_sae(cfg.run_dir / "sae")
    teacher, tok = load_teacher(cfg.teacher, path=resolve_teacher(cfg, sae))
    return teacher, tok, sae


def _brute_top(acts: torch.Tensor, n: int) -> list[list[tuple[float, int]]]:
    """Per latent, its ``n`` largest positive activations over all tokens as ``(activation, position)``, by
    activation then position (``acts`` ``(N_tokens, C)`` dense)."""
    out = []
    for c in range(acts.shape[1]):
        pairs = [(float(v), i) for i, v in enumerate(acts[:, c].tolist()) if v > 0]
        out.append(sorted(pairs, key=lambda p: (-p[0], p[1]))[:n])
    return out


# ------------------------------------------------------------------------------------------------ top-N
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_streaming_top_n_equals_sorting_everything_whatever_the_batches(batch):
    g = torch.Generator().manual_seed(0)
    m, k, c, n = 200, 3, 11, 4
    indices = torch.stack([torch.randperm(c, generator=g)[:k] for _ in range(m)])
    values = torch.randint(-1, 4, (m, k), generator=g).float()  # many ties and non-positive values
    dense = torch.zeros(m, c).scatter(1, indices, values.clamp(min=0))
    top = StreamingTopN(c, n)
    for s in range(0, m, batch):
        top.update(values[s:s + batch], indices[s:s + batch], torch.arange(s, min(s + batch, m)))
    for latent, want in enumerate(_brute_top(dense, n)):
        got = [(float(v), int(p)) for v, p in zip(top.values[latent], top.positions[latent]) if p >= 0]
        assert got == want
    assert top.tokens == m
    assert torch.equal(top.fired, (dense > 0).sum(0))


def test_descriptions_equal_brute_force_over_all_training_tokens(run):
    res = concepts(run)
    data = json.loads((run.run_dir / "sae" / CONCEPTS_FILE).read_text())
    assert res["path"] == str(run.run_dir / "sae" / CONCEPTS_FILE)
    teacher, tok, sae = _teacher_and_sae(run)
    windows = build_corpus(run.corpus, tok).train.windows
    with torch.no_grad():
        x, _, _ = sae.normalize(hidden_at_layer(teacher, windows, run.teacher.layer))
        acts = sae.dense_activations(*sae.encode(x)).reshape(-1, sae.n_latents)
    t = windows.shape[1]
    assert data["tokens"] == windows.numel()
    firing = 0
    for c, want in enumerate(_brute_top(acts, run.interpret.top_tokens)):
        entry = data["concepts"][c]
        got = [(e["activation"], e["window"] * t + e["position"]) for e in entry["top"]]
        assert [p for _, p in got] == [p for _, p in want]
        assert [a for a, _ in got] == pytest.approx([a for a, _ in want], rel=1e-5)
        assert entry["frequency"] == pytest.approx(float((acts[:, c] > 0).float().mean()))
        for e in entry["top"]:
            assert e["token_id"] == int(windows[e["window"], e["position"]])
            assert f"«{e['token']}»" in e["context"]
        firing += bool(want)
    assert res["firing"] == firing > 0


def test_descriptions_are_reused_and_recomputed_when_the_sae_changes(run, tmp_path):
    sae_dir = tmp_path / "sae"
    shutil.copytree(run.run_dir / "sae", sae_dir)
    (sae_dir / CONCEPTS_FILE).unlink(missing_ok=True)
    cfg = dataclasses.replace(run, labels=dataclasses.replace(run.labels, sae_path=str(sae_dir)))
    first = concepts(cfg)
    assert first["computed"] is True
    stamp = (sae_dir / CONCEPTS_FILE).stat().st_mtime_ns
    shutil.copy(sae_dir / CONCEPTS_FILE, tmp_path / "kept.json")
    assert concepts(cfg)["computed"] is False
    assert (sae_dir / CONCEPTS_FILE).stat().st_mtime_ns == stamp
    sae = load_sae(sae_dir)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec):  # the same latents, renumbered c -> n - 1 - c
            p.copy_(p.flip(0))
    save_sae(sae, sae_dir)
    (sae_dir / CONCEPTS_FILE).write_text((tmp_path / "kept.json").read_text())  # the old file, as if kept
    again = concepts(cfg)
    assert again["computed"] is True
    old = json.loads((tmp_path / "kept.json").read_text())["concepts"]
    new = json.loads((sae_dir / CONCEPTS_FILE).read_text())["concepts"]
    n = sae.n_latents
    assert old != new
    for c in range(n):
        assert new[n - 1 - c]["frequency"] == pytest.approx(old[c]["frequency"])
        assert [e["position"] for e in new[n - 1 - c]["top"]] == [e["position"] for e in old[c]["top"]]
    other = dataclasses.replace(cfg, interpret=dataclasses.replace(cfg.interpret, top_tokens=2))
    assert concepts(other)["computed"] is True  # another setting is another key


# ------------------------------------------------------------------------------------------------ explain
def _direct_concept_probs(model: StudentLM, ids: torch.Tensor) -> torch.Tensor:
    """Softmax of the concept head's logits, computed from the student's parts (gpt2 style)."""
    cfg = model.config
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        h = model.embed(ids) + model.pos_embed(pos)
        h = model.decoder(h, layers=slice(0, cfg.insert_layer), final_norm=False)
        x, _, _ = sae_layer_norm(h)
        z = (x - model.head.pre_bias) @ model.head.predictor.weight.T + model.head.predictor.bias
    return z.softmax(-1)[0]


def test_explain_probabilities_are_the_softmax_of_the_concept_head(run, capsys):
    res = explain(run)
    out = capsys.readouterr().out
    assert "top concepts: description (p)" in out
    assert json.loads(open(res["output"]).read())["tokens"] == res["tokens"]
    from conceptlm.cocomix.pipeline import _student_config
    from conceptlm.cocomix.student import load_student

    _, tok, _ = _teacher_and_sae(run)
    model = load_student(_student_config(run, "cocomix", 0, len(tok)), res["checkpoint"])
    ids = torch.tensor([[r["token_id"] for r in res["tokens"]]])
    assert ids.shape[1] == run.interpret.prompt_tokens
    assert torch.equal(ids[0], build_corpus(run.corpus, tok).val.windows[0, :ids.shape[1]])
    probs = _direct_concept_probs(model, ids)
    for t in (0, 3, ids.shape[1] - 1):
        want_p, want_c = probs[t].topk(run.interpret.top_concepts)
        row = res["tokens"][t]
        assert [c["concept"] for c in row["concepts"]] == want_c.tolist()
        assert [c["p"] for c in row["concepts"]] == pytest.approx(want_p.tolist(), rel=1e-5, abs=1e-7)
    # the arg-max is the head's first kept concept in the model's own forward
    with torch.no_grad():
        kept = model(ids).concept.indices[0, :, 0]
    assert torch.equal(concept_logits(model, ids)[0].argmax(-1), kept)


def test_explain_a_given_prompt(run, tmp_path, capsys):
    cfg = dataclasses.replace(run, interpret=dataclasses.replace(run.interpret, prompt="the river and the boat",
                                                                 top_concepts=2))
    res = explain(cfg, output=tmp_path / "e.json")
    assert res["output"] == str(tmp_path / "e.json") and (tmp_path / "e.json").is_file()
    assert all(len(r["concepts"]) == 2 for r in res["tokens"])
    assert "river" in res["prompt"]


# ------------------------------------------------------------------------------------------------ steer
def test_steer_with_factor_one_gives_identical_texts(run, tmp_path, capsys):
    cfg = dataclasses.replace(run, interpret=dataclasses.replace(run.interpret, steer_factor=1.0, temperature=1.0))
    res = steer(cfg, output=tmp_path / "s.json")
    assert res["identical"] is True and res["plain"]["text"] == res["steered"]["text"]
    assert res["plain"]["sae_activation"] == res["steered"]["sae_activation"]
    assert "teacher SAE activation (mean)" in capsys.readouterr().out
    assert 0 <= res["concept"] < run.student.n_concepts


def test_steer_measures_match_their_definitions(run, tmp_path):
    cfg = dataclasses.replace(run, interpret=dataclasses.replace(run.interpret, steer_concept=3, steer_factor=50.0,
                                                                 steer_force=True))
    res = steer(cfg, output=tmp_path / "s.json")
    assert res["concept"] == 3 and res["concept_choice"] == "interpret.steer_concept"
    teacher, tok, sae = _teacher_and_sae(run)
    data = json.loads((run.run_dir / "sae" / CONCEPTS_FILE).read_text())
    vocab = set(data["concepts"][3]["token_ids"])
    prompt = build_corpus(run.corpus, tok).val.windows[:1, :run.interpret.prompt_tokens]
    for kind in ("plain", "steered"):
        new = res[kind]["token_ids"]
        assert len(new) == run.interpret.max_new_tokens
        assert res[kind]["top_token_frequency"] == pytest.approx(sum(t in vocab for t in new) / len(new))
        seq = torch.cat((prompt, torch.tensor([new])), 1)
        with torch.no_grad():
            x, _, _ = sae.normalize(hidden_at_layer(teacher, seq, run.teacher.layer))
            dense = sae.dense_activations(*sae.encode(x))[0, prompt.shape[1]:, 3]
        assert res[kind]["sae_activation"] == pytest.approx(float(dense.mean()), abs=1e-6)


def _constructed_student(vocab: int, target: int, concept: int) -> StudentLM:
    """A student whose concept ``concept`` is off (negative logit, never kept) and whose compress column of it is the
    direction of token ``target``'s embedding: forcing the concept in makes the concept slot (which predicts the
    next token) point at ``target``."""
    torch.manual_seed(0)
    s = StudentSection(style="gpt2", vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, max_len=64,
                       insert_layer=1, n_concepts=32, concept_k=4, mix="interleave")
    model = StudentLM(s).eval()
    with torch.no_grad():
        model.embed.weight.mul_(20.0)  # sharper next-token distributions (tied embeddings)
        model.head.predictor.bias[concept] = -5.0  # never among the kept concepts unless forced
        model.head.compress.weight[concept] = model.embed.weight[target] / model.embed.weight[target].norm()
    return model


def _constructed_sae(teacher, windows, layer: int, target: int, concept: int) -> TopKSAE:
    """An SAE (every latent kept) whose latent ``concept`` reads how far a token's normalised residual lies in the
    direction from the mean residual to the mean residual of ``target``."""
    with torch.no_grad():
        h = hidden_at_layer(teacher, windows, layer)
        sae = TopKSAE(h.shape[-1], 32, 32, seed=0)
        x, _, _ = sae.normalize(h)
        centre = x.reshape(-1, x.shape[-1]).mean(0)
        direction = x[windows == target].mean(0) - centre
        sae.b_dec.copy_(centre)
        sae.W_enc[concept] = direction / direction.norm()
        sae.b_enc.zero_()
    return sae


def test_steering_mechanism_raises_the_concepts_tokens_and_its_sae_activation(run):
    """Constructed weights (a 4-step tiny run has no reliable concept yet): forcing in a concept whose compress
    column points at a token makes the steered text use that token, and the teacher's SAE latent that reads the
    token is more active on the steered text."""
    teacher, tok, _ = _teacher_and_sae(run)
    windows = build_corpus(run.corpus, tok).train.windows
    target = int(torch.bincount(windows.reshape(-1)).argsort()[-5])  # a common token, not the most common
    concept = 7
    sae = _constructed_sae(teacher, windows, run.teacher.layer, target, concept)
    values, indices = sae_activations(teacher, sae, run.teacher.layer, windows[:4])
    act = torch.where(indices == concept, values, 0.0).sum(-1)
    assert act[windows[:4] == target].mean() > 2 * act[windows[:4] != target].mean()  # the latent reads it
    model = _constructed_student(len(tok), target, concept)
    prompt = windows[:1, :8]
    gen = lambda s: generate(model, prompt, max_new_tokens=24, temperature=1.0,  # noqa: E731
                             generator=torch.Generator().manual_seed(0), steer=s)[0, 8:].tolist()
    plain, steered = gen(None), gen(Steering(concept, 30.0, force=True))
    assert plain == gen(Steering(concept, 30.0))  # an off concept is not steered by a factor alone
    assert plain != steered
    assert token_frequency(steered, {target}) > token_frequency(plain, {target}) + 0.5
    act_of = lambda new: concept_activation(teacher, sae, run.teacher.layer,  # noqa: E731
                                            torch.cat((prompt, torch.tensor([new])), 1), concept, start=8)["mean"]
    assert act_of(steered) > 2 * act_of(plain)


# ------------------------------------------------------------------------------------------------ errors
def test_bad_inputs_are_one_line_config_errors(run, tmp_path):
    with pytest.raises(ConfigError, match="interpret.arm.*unknown arm 'bogus'"):
        _cfg(tmp_path, "interpret.arm=bogus")
    cases = [
        ({"arm": "ntp"}, "has no concept head"),
        ({"seed": 5}, "no student checkpoint in .*cocomix-s5"),
        ({"steer_concept": 32}, "interpret.steer_concept.*out of range.*32 concepts"),
        ({"prompt": "word " * 40}, "interpret.prompt.*tokens; at most"),
    ]
    for change, message in cases:
        cfg = dataclasses.replace(run, interpret=dataclasses.replace(run.interpret, **change))
        with pytest.raises(ConfigError, match=message) as err:
            steer(cfg)
        assert "\n" not in str(err.value)
    bad = dataclasses.replace(run, interpret=dataclasses.replace(run.interpret, arm="bogus"))
    with pytest.raises(ConfigError, match="unknown arm"):
        explain(bad)
    with pytest.raises(ConfigError, match="checkpoint.*neither a student checkpoint"):
        explain(run, checkpoint=tmp_path)
    with pytest.raises(ConceptLMError, match="no SAE at"):
        concepts(dataclasses.replace(run, labels=dataclasses.replace(run.labels, sae_path=str(tmp_path))))


def test_cli_explain_and_steer_print_their_tables_and_name_the_file(run, tmp_path, capsys):
    from conceptlm.cli import main

    base = ["--config", CONFIG, f"run.out_dir={run.run.out_dir}", *TINY]
    assert main(["cocomix", "explain", *base, "--output", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "top concepts: description (p)" in out and out.rstrip().endswith(f"written: {tmp_path / 'e.json'}")
    assert "\n{" not in out  # the whole result is in the file, not dumped after the table
    assert json.loads((tmp_path / "e.json").read_text())["tokens"]
    assert main(["cocomix", "steer", *base, "--output", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "teacher SAE activation (mean)" in out and out.rstrip().endswith(f"written: {tmp_path / 's.json'}")
