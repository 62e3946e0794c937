"""Hub-format export of every LCM variant and the LCM in lm-evaluation-harness: ``AutoModel.from_pretrained`` outside
conceptlm gives the same outputs bit for bit; conceptlm reads the folder back (same generation as the checkpoint);
the export is reused by identity; ``conceptlm-lcm`` generates what ``lcm generate`` does, scored by the harness as
computed by hand; likelihood requests are refused with the reason."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conceptlm.core.artifact import StaleArtifactError, read_manifest
from conceptlm.core.errors import CheckpointError
from conceptlm.lcm.config import DiffusionSection, LCMSection, QuantSection
from conceptlm.lcm.hub import MODELING_FILE, export_lcm, is_hub_lcm, load_hub_lcm
from conceptlm.lcm.variants import build_unit

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
CASES = {"base": ("base", {}), "base_learned": ("base", {"positions": "learned", "scale_embeddings": True}),
         "two_tower": ("two_tower", {}), "one_tower": ("one_tower", {}),
         "one_tower_learned": ("one_tower", {"positions": "learned"}), "quant_d": ("quant_d", {}),
         "quant_c": ("quant_c", {"positions": "learned"})}


def _model(variant: str, **kw):
    """A tiny model with non-trivial weights (AdaLN modulation is zero at init), normalizer and codebooks."""
    torch.manual_seed(len(variant) + len(kw))
    cfg = LCMSection(model=variant, dim=8, d_model=16, n_layers=2, n_heads=2, d_ff=24, dropout=0.0, max_sentences=10,
                     diffusion=DiffusionSection(num_train_steps=20), quant=QuantSection(n_codebooks=3, codebook_size=5),
                     **kw)
    m = build_unit(cfg).model.eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    m.set_normalizer(0.1 * torch.randn(8), torch.rand(8) + 0.5, torch.full((8,), -3.0), torch.full((8,), 3.0))
    if variant.startswith("quant"):
        m.quantizer.set_codebooks(torch.randn(3, 5, 8))
    return m


def _inputs_and_outputs(model) -> dict:
    """Inputs in raw space, the conceptlm model's outputs: plain, and with padding and CFG-dropped rows."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 8, generator=g)
    keep = torch.ones(3, 6, dtype=torch.bool)
    keep[1, 4:] = False
    drop = torch.rand(3, 6, generator=g) < 0.3
    z = model.normalize(x)
    v = model.cfg.model
    with torch.no_grad():
        if v == "base":
            args = {}
            plain, masked = model.forward_normalized(z), model.forward_normalized(z, key_padding_mask=keep)
        elif v in ("two_tower", "one_tower"):
            args = {"noisy": torch.randn(3, 6, 8, generator=g), "timesteps": torch.randint(0, 20, (3, 6), generator=g)}
            if v == "two_tower":
                plain = model.forward_normalized(z, args["noisy"], args["timesteps"])
                masked = model.forward_normalized(z, args["noisy"], args["timesteps"], drop=drop)
            else:
                plain = model.forward_normalized(args["noisy"], args["timesteps"], z)
                masked = model.forward_normalized(args["noisy"], args["timesteps"], z, keep=keep, drop=drop)
        else:
            stages = torch.randint(0, 3, (3, 6), generator=g)
            args = {"queries": model.query_inputs(model.quantizer.encode(z), stages), "stages": stages}
            plain = model.forward_interleaved(args["queries"], z, stages)
            masked = model.forward_interleaved(args["queries"], z, stages, keep=keep, drop=drop)
        out = {"x": x, "keep": keep, "drop": drop, "args": args, "plain": plain, "masked": masked, "z": z,
               "raw": model.denormalize(plain if v != "quant_d" else z)}  # (quant_d: logits are not vectors)
        if v == "base":
            out["next"] = model.forward(x)[:, -1]
    return out


def test_automodel_gives_the_same_outputs_for_every_variant(tmp_path):
    """In this process (fast): AutoModel.from_pretrained of each variant's export reproduces the conceptlm model's
    normalizer and forward exactly, with padding and CFG-dropped rows; the fresh-interpreter test below shows it
    needs nothing of conceptlm."""
    from transformers import AutoModel

    for variant in ("base", "two_tower", "one_tower", "quant_d", "quant_c"):
        name, model = variant, _model(variant)
        r = _inputs_and_outputs(model)
        m = AutoModel.from_pretrained(str(export_lcm(model, tmp_path / name)), trust_remote_code=True)
        extra = {"attention_mask": r["keep"]} if variant in ("base", "one_tower", "quant_d", "quant_c") else {}
        if variant != "base":
            extra["drop"] = r["drop"]
        with torch.no_grad():
            assert not m.training and torch.equal(m.normalize(r["x"]), r["z"]), name
            assert torch.equal(m(r["z"], **r["args"]).prediction, r["plain"]), name
            assert torch.equal(m(r["z"], **r["args"], **extra).prediction, r["masked"]), name
        if variant.startswith("quant"):
            assert torch.equal(m.codebooks, model.quantizer.codebooks)


def test_the_likelihood_lcm_exports_as_the_base_network(tmp_path):
    """lcm.model=likelihood is a Base-LCM trained by another loss: its export is the base network (config.json keeps
    the trained-as section) with the same outputs, and conceptlm reads it back as that model."""
    from transformers import AutoModel

    model = _model("likelihood", likelihood_decoder="runs/x/decoder")  # read only when training
    folder = export_lcm(model, tmp_path / "likelihood")
    data = json.loads((folder / "config.json").read_text())
    assert data["variant"] == "base" and data["lcm"]["model"] == "likelihood"
    m = AutoModel.from_pretrained(str(folder), trust_remote_code=True)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z = model.normalize(x)
        assert torch.equal(m(z).prediction, model.forward_normalized(z))
        back = load_hub_lcm(folder)
        assert back.cfg.model == "likelihood" and torch.equal(back.forward(x), model.forward(x))


@pytest.mark.slow
def test_from_pretrained_without_conceptlm_gives_identical_outputs(tmp_path):
    """One fresh interpreter, without conceptlm on its path, loads every variant with AutoModel (trust_remote_code);
    its normalizer and forward outputs equal the conceptlm model's exactly (torch.equal: the same operations in the
    same order; same device and thread count, as the kernels' reduction order depends on both)."""
    folders = []
    for name, (variant, kw) in CASES.items():
        model = _model(variant, **kw)
        folder = export_lcm(model, tmp_path / name)
        assert {"config.json", "model.safetensors", MODELING_FILE, "normalizer.json", "README.md"} <= {
            p.name for p in folder.iterdir()}
        torch.save(_inputs_and_outputs(model), folder / "expected.pt")
        folders.append(str(folder))
    code = f"""
import sys, torch
from transformers import AutoModel
torch.set_num_threads({torch.get_num_threads()})
for folder in {folders!r}:
    m = AutoModel.from_pretrained(folder, trust_remote_code=True)
    r = torch.load(folder + "/expected.pt")
    v = m.config.variant
    extra = {{"attention_mask": r["keep"]}} if v == "base" else {{"drop": r["drop"]}}
    if v in ("one_tower", "quant_d", "quant_c"):
        extra["attention_mask"] = r["keep"]
    with torch.no_grad():
        z = m.normalize(r["x"])
        ok = [m.training is False, torch.equal(z, r["z"]), torch.equal(m(z, **r["args"]).prediction, r["plain"]),
              torch.equal(m(z, **r["args"], **extra).prediction, r["masked"]),
              torch.equal(m.denormalize(r["plain"] if v != "quant_d" else z), r["raw"])]
        if v == "base":
            ok.append(torch.equal(m.predict_next(r["x"]), r["next"]))
    print(folder.rsplit("/", 1)[-1], all(ok), ok)
print("conceptlm imported:", any(m == "conceptlm" or m.startswith("conceptlm.") for m in sys.modules))
"""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "conceptlm imported: False"
    assert [" ".join(line.split()[:2]) for line in lines[:-1]] == [f"{n} True" for n in CASES], lines


def test_the_folder_records_everything_and_conceptlm_reads_it_back(tmp_path):
    from conceptlm.lcm.data.normalizer import RobustNormalizer
    from conceptlm.lcm.train import load_lcm

    model = _model("quant_d")
    folder = export_lcm(model, tmp_path / "hub", meta={"encoder": {"name": "fake", "fingerprint": "abc"}},
                        extra_files={"encoder.json": {"name": "fake", "fingerprint": "abc"}})
    assert is_hub_lcm(folder) and not is_hub_lcm(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["variant"] == "quant_d" and config["auto_map"]["AutoModel"] == "modeling_lcm.LCMHubModel"
    assert LCMSection.from_dict(config["lcm"]) == model.cfg  # every hyperparameter, sub-sections included
    assert config["conceptlm"]["encoder"]["fingerprint"] == "abc"
    assert json.loads((folder / "encoder.json").read_text())["name"] == "fake"
    norm = RobustNormalizer.from_pretrained(folder)
    for name in ("center", "scale", "clip_min", "clip_max"):
        assert torch.equal(getattr(norm, name), getattr(model, name))
    assert "trust_remote_code=True" in (folder / "README.md").read_text()
    for back in (load_hub_lcm(folder), load_lcm(folder)):  # load_lcm takes an export wherever it takes a checkpoint
        assert type(back) is type(model) and not back.training
        mine, theirs = model.state_dict(), back.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_damaged_export_is_refused(tmp_path):
    from conceptlm.core.artifact import Identity

    folder = export_lcm(_model("base"), tmp_path / "hub", identity=Identity(kind="lcm.hub"))
    assert set(read_manifest(folder)["files"]) >= {"model.safetensors", "config.json", MODELING_FILE}
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.*checksum.*export it again"):
        load_hub_lcm(folder)


# ------------------------------------------------------------------------------------------------ a real run
def _overrides(tmp: Path, name: str) -> list[str]:
    return [f"run.out_dir={tmp}", f"run.name={name}", f"prepare.out_dir={tmp}/data", "docs.n_documents=30",
            "prepare.val_fraction=0.2", "prepare.shard_size=16", "train.max_steps=6", "train.save_every=3",
            "train.eval_every=0", "train.micro_batch_size=8", "schedule.warmup_steps=2", "generate.documents=2",
            "generate.max_new_sentences=3", "train.progress=false", "lcm.diffusion.num_train_steps=10",
            "generate.diffusion.inference_steps=3", "lcm.n_denoiser_layers=1", "generate.diffusion.guidance_scale=2.0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Prepared documents, a retrieval decoder, a Base-LCM and a Two-Tower LCM (6 steps each)."""
    from conceptlm.core.config import load_config
    from conceptlm.lcm.config import LCMConfig
    from conceptlm.lcm.recipe import prepare, train, train_decoder

    tmp = tmp_path_factory.mktemp("lcm_hub")
    base = load_config(LCMConfig, REPO / "configs/lcm/tiny_cpu.yaml", _overrides(tmp, "base"))
    prepare(base)
    train_decoder(base)
    train(base)
    two = load_config(LCMConfig, REPO / "configs/lcm/tiny_cpu.yaml",
                      _overrides(tmp, "two") + ["lcm.model=two_tower", f"decoder.path={base.decoder_dir}"])
    train(two)
    return {"base": base, "two_tower": two}


def _documents(path: str) -> list[dict]:
    return [{k: d[k] for k in ("id", "prompt", "continuation", "stop")}
            for d in json.loads(Path(path).read_text())["documents"]]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["base", "two_tower"])
def test_export_verb_generates_like_the_checkpoint_and_is_reused_by_identity(runs, variant, capsys):
    from conceptlm.cli import main
    from conceptlm.lcm.recipe import generate

    cfg = runs[variant]
    argv = ["lcm", "export", "--config", str(REPO / "configs/lcm/tiny_cpu.yaml"), *_overrides(cfg.run_dir.parent,
                                                                                            cfg.run.name)]
    if variant == "two_tower":
        argv += ["lcm.model=two_tower", f"decoder.path={runs['base'].decoder_dir}"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    hub = Path(out["output"])
    assert hub == cfg.run_dir / "hub" and out["reused"] is False and out["variant"] == variant
    meta = json.loads((hub / "config.json").read_text())["conceptlm"]
    assert meta["encoder"]["dim"] == 384 and meta["encoder"]["fingerprint"] and meta["prepared"]
    assert meta["decoder"]["kind"] == "retrieval" and meta["decoder"]["fingerprint"]
    manifest = read_manifest(hub)
    assert manifest["kind"] == "lcm.hub" and manifest["inputs"]["weights"] == meta["weights_sha256"]

    from_ckpt = generate(cfg, output=str(cfg.run_dir / "g_ckpt.json"))
    from_hub = generate(cfg, checkpoint=str(hub), output=str(cfg.run_dir / "g_hub.json"))
    assert from_hub["checkpoint"] == str(hub)
    assert _documents(from_hub["output"]) == _documents(from_ckpt["output"])  # same text, prompts and stops
    capsys.readouterr()

    assert main(argv) == 0 and json.loads(capsys.readouterr().out)["reused"] is True  # same inputs: reused
    older = str(cfg.run_dir / "checkpoints" / "step_00000003")
    assert main(argv + ["--checkpoint", older]) == 2  # other weights, same folder: refused, naming what changed
    assert "input weights changed" in capsys.readouterr().err and read_manifest(hub) == manifest
    assert main(argv + ["export.on_change=rebuild", "--checkpoint", older]) == 0
    assert json.loads(capsys.readouterr().out)["reused"] is False and read_manifest(hub) != manifest


@pytest.mark.slow
def test_a_changed_decoder_makes_the_export_stale(runs, tmp_path):
    """The export records the decoder the config names (by its artifact fingerprint): another decoder (here a bank
    of half the sentences) is a changed input."""
    from conceptlm.core.artifact import Identity
    from conceptlm.lcm.decoders import RetrievalDecoder, load_decoder
    from conceptlm.lcm.hub import export

    cfg = runs["base"]
    assert export(cfg, output=str(tmp_path / "hub"))["reused"] is False
    bank = load_decoder(cfg.decoder_dir)
    half = len(bank.sentences) // 2
    RetrievalDecoder(bank.embeddings[:half], bank.sentences[:half], bank.encoder_identity, normalized=True).save(
        tmp_path / "half", identity=Identity(kind="lcm.decoder", settings={"sentences": half}))
    other = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, path=str(tmp_path / "half")))
    with pytest.raises(StaleArtifactError, match="input decoder changed.*export.on_change=rebuild"):
        export(other, output=str(tmp_path / "hub"))


# ------------------------------------------------------------------------------------------------ the harness
@pytest.mark.slow
def test_harness_generation_is_conceptlms_own_and_scored_as_by_hand(runs, tmp_path):
    """A local generate task of four prompts; targets: conceptlm's own continuation (``lcm generate`` with that
    prompt) for three of them and another text for the fourth, so exact_match must be 3/4; the harness's logged
    responses are those continuations; ``until`` cuts a response; the verb's results are reused."""
    from conceptlm.harness.evaluate import evaluate, summarize
    from conceptlm.harness.tasks import write_task
    from conceptlm.lcm.data.store import EmbeddedDocuments
    from conceptlm.lcm.harness import LCMHarnessLM, eval_harness
    from conceptlm.lcm.recipe import generate, load_run

    cfg = runs["base"]
    docs = EmbeddedDocuments(cfg.data_dir, "validation")
    prompts = [" ".join(docs[i]["sentences"][:2]) for i in range(4)]
    own = []
    for i, p in enumerate(prompts):
        g = dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, prompt=p))
        own.append(_documents(generate(g, output=str(tmp_path / f"own{i}.json"))["output"])[0]["continuation"])
    texts = [" ".join(s) for s in own]
    assert all(texts)
    rows = [{"prompt": p, "target": t} for p, t in zip(prompts, texts)]
    rows[3]["target"] = "Not what the model says."
    tasks = tmp_path / "tasks"
    write_task(tasks, "lcm_gen", rows, kind="generate")
    write_task(tasks, "lcm_gen_first", [{"prompt": prompts[0], "target": own[0][0].split(".")[0]}], kind="generate",
               until=["."])

    lm = LCMHarnessLM(run=load_run(cfg), cfg=cfg)
    res = evaluate(lm, tasks=["lcm_gen", "lcm_gen_first"], include_path=tasks, log_samples=True)
    assert summarize(res)["lcm_gen"]["exact_match"] == pytest.approx(3 / 4)
    assert summarize(res)["lcm_gen_first"]["exact_match"] == 1.0  # cut at the first "."
    responses = {s["doc"]["prompt"]: s["resps"][0][0] for s in res["samples"]["lcm_gen"]}
    assert responses == dict(zip(prompts, texts))

    over = dataclasses.replace(cfg.harness, tasks=["lcm_gen"], include_path=str(tasks))
    vcfg = dataclasses.replace(cfg, harness=over)
    first = eval_harness(vcfg)
    assert first["summary"]["lcm_gen"]["exact_match"] == pytest.approx(3 / 4) and first["reused"] is False
    assert eval_harness(vcfg)["reused"] is True
    shorter = dataclasses.replace(vcfg, harness=dataclasses.replace(over, max_sentences=1))
    again = eval_harness(shorter)  # one sentence per prompt: other settings, evaluated again
    assert again["reused"] is False and again["summary"]["lcm_gen"]["exact_match"] <= 3 / 4


@pytest.mark.slow
def test_harness_model_by_name_on_the_export_and_likelihood_is_refused(runs, tmp_path):
    """``conceptlm-lcm`` from its argument string (``pretrained=`` an export folder, the encoder and decoder it
    recorded, defaults otherwise); a multiple-choice task raises the one-line reason."""
    from conceptlm.harness.evaluate import evaluate, summarize
    from conceptlm.harness.tasks import write_task
    from conceptlm.lcm.harness import NoTokenLikelihood
    from conceptlm.lcm.hub import export
    from conceptlm.lcm.recipe import generate

    cfg = runs["base"]
    hub = export(cfg, output=str(tmp_path / "hub"))["output"]
    prompt = "Anna lived in a small house in Riverton. Every morning she walked to the harbor with her dog."
    g = dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, prompt=prompt, max_new_sentences=2))
    text = " ".join(_documents(generate(g, checkpoint=hub, output=str(tmp_path / "g.json"))["output"])[0]
                    ["continuation"])
    tasks = tmp_path / "tasks"
    write_task(tasks, "one", [{"prompt": prompt, "target": text}], kind="generate")
    res = evaluate("conceptlm-lcm", model_args=f"pretrained={hub},max_sentences=2", tasks=["one"],
                   include_path=tasks)
    assert summarize(res)["one"]["exact_match"] == 1.0
    write_task(tasks, "mc", [{"question": prompt, "choices": ["yes", "no"], "answer": 0}])
    with pytest.raises(NoTokenLikelihood, match="no token likelihood.*generate_until"):
        evaluate("conceptlm-lcm", model_args=f"pretrained={hub}", tasks=["mc"], include_path=tasks)


def test_cli_offers_export_and_eval_harness(capsys):
    from conceptlm.cli import main

    with pytest.raises(SystemExit):
        main(["lcm", "--help"])
    text = capsys.readouterr().out
    assert "export" in text and "eval-harness" in text
    assert main(["lcm", "eval-harness", "--config", str(REPO / "configs/lcm/tiny_cpu.yaml")]) == 2
    assert "harness.tasks" in capsys.readouterr().err  # no tasks named: one line saying how
