"""CoCoMix hardening: foreign SAEs (sparsify, SAELens, OpenAI) load through ``labels.sae_path`` and label exactly
like their conversion; bad input (damaged label arrays, damaged or pickled teacher weights, a lone surrogate, a
``k_attr`` or latent count the SAE cannot serve, a full disk) is a one-line error before anything is written; a
truncated file corpus says how much was cut."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conceptlm.cli import main
from conceptlm.cocomix.config import CocomixConfig, CorpusSection
from conceptlm.cocomix.corpus import load_documents, read_documents
from conceptlm.cocomix.label_cache import LABELS, MASK, LabelCache, LabelCacheError
from conceptlm.cocomix.labels import label, resolve_sae_dir
from conceptlm.cocomix.sae import TopKSAE, load_sae, save_sae
from conceptlm.cocomix.sae_formats import load_any_sae
from conceptlm.core.config import load_config
from conceptlm.core.errors import ConceptLMError, ConfigError, DataError
from conceptlm.core.hf import build_tiny_model, save_model
from conceptlm.core.tokenizer import train_bpe_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = "configs/cocomix/tiny_cpu.yaml"
D, C, K = 32, 48, 4


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    """A tiny teacher export (width 32, 2 blocks, BPE tokenizer of the generated corpus) and our SAE on block 1."""
    root = tmp_path_factory.mktemp("hardening")
    corpus = CorpusSection(n_documents=24, window=16, val_fraction=0.25)
    tok = train_bpe_tokenizer(load_documents(corpus), vocab_size=300)
    model = build_tiny_model("llama", len(tok), hidden_size=D, num_layers=2, num_heads=4, seed=0,
                             eos_token_id=tok.eos_token_id)
    save_model(model, root / "teacher", tok)
    sae = TopKSAE(D, C, K, seed=0)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(C, generator=_g(1)))
        sae.b_dec.copy_(0.1 * torch.randn(D, generator=_g(2)))
    save_sae(sae, root / "sae", layer=1)
    return root


def overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"run.out_dir={out}", f"teacher.path={root / 'teacher'}", "teacher.layer=1",
            "corpus.n_documents=24", "corpus.window=16", "corpus.val_fraction=0.25",
            f"sae.n_latents={C}", f"sae.k={K}", f"student.n_concepts={C}", f"student.concept_k={K}",
            "student.max_len=16", "labels.batch_size=4", "labels.chunk_windows=8", "labels.progress=false",
            f"labels.sae_path={root / 'sae'}", *extra]


def make_cfg(root: Path, out: Path, *extra: str) -> CocomixConfig:
    return load_config(CocomixConfig, CONFIG, overrides(root, out, *extra))


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def assert_one_line_cli_error(rc: int, err: str, *needles: str) -> None:
    assert rc != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("conceptlm: error:")
    for needle in needles:
        assert needle in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------ foreign SAEs
def _write_sparsify(path: Path) -> None:
    """EleutherAI sparsify's ``save_to_disk`` layout (plain TopK, no input normalization)."""
    g = _g(11)
    path.mkdir()
    # small biases: the raw residual of a fresh tiny teacher is small, and this layout does not normalize it
    save_file({"encoder.weight": torch.randn(C, D, generator=g), "encoder.bias": torch.randn(C, generator=g) * 1e-3,
               "W_dec": torch.randn(C, D, generator=g) * 0.3, "b_dec": torch.randn(D, generator=g) * 1e-3},
              str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"d_in": D, "num_latents": C, "k": K, "activation": "topk",
                                               "expansion_factor": 32, "normalize_decoder": True,
                                               "multi_topk": False, "skip_connection": False,
                                               "transcode": False}))


def _write_saelens(path: Path) -> None:
    """SAELens ``save_model`` layout, TopK with layer-norm input and the decoder bias not subtracted (folded)."""
    g = _g(12)
    path.mkdir()
    save_file({"W_enc": torch.randn(D, C, generator=g) * 0.3, "b_enc": torch.randn(C, generator=g) * 0.1,
               "W_dec": torch.randn(C, D, generator=g) * 0.3, "b_dec": torch.randn(D, generator=g) * 0.2},
              str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": D, "d_sae": C, "k": K,
                                               "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
                                               "normalize_activations": "layer_norm",
                                               "reshape_activations": "none"}))


def _write_openai(path: Path) -> None:
    """An OpenAI ``sparse_autoencoder`` TopK state dict (``.pt``, layer-normed input)."""
    g = _g(13)
    torch.save({"pre_bias": torch.randn(D, generator=g) * 0.2, "encoder.weight": torch.randn(C, D, generator=g) * 0.3,
                "latent_bias": torch.randn(C, generator=g) * 0.1,
                "decoder.weight": torch.randn(D, C, generator=g) * 0.3,
                "stats_last_nonzero": torch.zeros(C, dtype=torch.long), "activation": "TopK",
                "activation_state_dict": {"k": K, "postact_fn": "ReLU"}}, path)


WRITERS = {"sparsify": (_write_sparsify, "sp"), "saelens": (_write_saelens, "sl"), "openai": (_write_openai, "5.pt")}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_labels_sae_path_loads_a_foreign_sae_and_labels_like_its_conversion(env, tmp_path, fmt):
    write, name = WRITERS[fmt]
    foreign = tmp_path / name
    write(foreign)
    converted = save_sae(load_any_sae(foreign), tmp_path / "converted", layer=1)
    cfg = make_cfg(env, tmp_path, f"labels.sae_path={foreign}")
    assert resolve_sae_dir(cfg) == foreign
    sae = load_sae(foreign)  # the loading path label() uses
    assert (sae.d_in, sae.n_latents, sae.k, sae.meta["source_format"]) == (D, C, K, fmt)
    h = torch.randn(20, D, generator=_g(5)) * 2 + 0.5
    ref = load_sae(converted)
    with torch.no_grad():
        for a, b in zip(sae.encode(sae.normalize(h)[0]), ref.encode(ref.normalize(h)[0])):
            assert torch.equal(a, b)
    got = label(cfg, output=tmp_path / "from_foreign")
    want = label(cfg, checkpoint=converted, output=tmp_path / "from_converted")
    assert got["sae"] == str(foreign) and got["windows"] == want["windows"] > 0
    for split in ("train", "val"):
        a = np.load(tmp_path / "from_foreign" / split / LABELS)
        b = np.load(tmp_path / "from_converted" / split / LABELS)
        assert np.array_equal(a, b) and len(np.unique(a)) > K
        assert np.array_equal(np.load(tmp_path / "from_foreign" / split / MASK),
                              np.load(tmp_path / "from_converted" / split / MASK))


def test_concept_descriptions_of_a_foreign_sae_file_are_keyed_by_its_bytes(env, tmp_path):
    from conceptlm.cocomix.corpus import build_corpus
    from conceptlm.cocomix.descriptions import describe_concepts
    from conceptlm.cocomix.teacher import load_teacher

    pt = tmp_path / "5.pt"
    _write_openai(pt)
    cfg = make_cfg(env, tmp_path, f"labels.sae_path={pt}", "interpret.describe_windows=4")
    teacher, tok = load_teacher(cfg.teacher)
    windows = build_corpus(cfg.corpus, tok).train.windows
    kw = dict(teacher=teacher, tokenizer=tok, sae=load_sae(pt), sae_dir=resolve_sae_dir(cfg), windows=windows)
    first = describe_concepts(cfg, **kw)
    assert first.computed and first.path == tmp_path / "5.concepts.json" and first.n_concepts == C
    assert not describe_concepts(cfg, **kw).computed
    _write_openai(pt)  # the same bytes: still reused
    assert not describe_concepts(cfg, **kw).computed


def test_an_unrecognised_sae_folder_is_one_line_naming_it(env, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "weights.bin").write_bytes(b"\0" * 16)
    cfg = make_cfg(env, tmp_path, f"labels.sae_path={odd}")
    with pytest.raises(ConfigError, match="labels.sae_path.*no SAE at .*odd: not a known SAE format") as err:
        label(cfg)
    assert "\n" not in str(err.value)
    assert not (cfg.run_dir / "labels").exists()


# ------------------------------------------------------------------------------------------------ SAE vs config
def test_k_attr_larger_than_the_sae_k_is_refused_before_anything_is_written(env, tmp_path):
    cfg = make_cfg(env, tmp_path, f"labels.k_attr={K + 1}", f"cocomix.k_attr={K + 1}")
    with pytest.raises(ConfigError, match=r"field 'labels.k_attr'.*k=4") as err:
        label(cfg)
    assert str(env / "sae") in str(err.value) and "\n" not in str(err.value)
    assert not (cfg.run_dir / "labels").exists()


def test_sae_latent_count_must_match_the_config_before_the_label_pass(env, tmp_path):
    cfg = make_cfg(env, tmp_path, "sae.n_latents=64", "student.n_concepts=64")
    with pytest.raises(ConfigError, match=r"field 'sae.n_latents'.*has 48 latents.*sae.n_latents is 64") as err:
        label(cfg)
    assert str(env / "sae") in str(err.value)
    assert not (cfg.run_dir / "labels").exists()


# ------------------------------------------------------------------------------------------------ label arrays
@pytest.fixture(scope="module")
def cache(env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache")
    label(make_cfg(env, out), output=out / "labels")
    return out / "labels" / "train"


def _copy(cache: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cache, tmp_path / "train"))


@pytest.mark.parametrize("name", [LABELS, MASK])
def test_a_truncated_label_array_is_a_one_line_error_naming_it(cache, tmp_path, name):
    assert LabelCache(cache)[0][0].shape == (16, 4)
    copy = _copy(cache, tmp_path)
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data[: len(data) - 40])
    with pytest.raises(LabelCacheError, match=f"{name}: unreadable, truncated") as err:
        LabelCache(copy)[0]
    assert "\n" not in str(err.value)


def test_an_object_dtype_label_array_is_refused_without_unpickling(cache, tmp_path):
    copy = _copy(cache, tmp_path)
    shape = np.load(copy / LABELS, mmap_mode="r").shape
    np.save(copy / LABELS, np.full(shape, None, dtype=object), allow_pickle=True)
    with pytest.raises(LabelCacheError, match=f"{LABELS}: unreadable.*not a plain integer array"):
        LabelCache(copy)[0]


def test_a_full_disk_while_creating_the_label_arrays_leaves_nothing_behind(env, tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    cfg = make_cfg(env, tmp_path)
    with pytest.raises(LabelCacheError, match=r"labels/train: no space left on the device") as err:
        label(cfg)
    assert "\n" not in str(err.value)
    assert not (cfg.run_dir / "labels").exists()


# ------------------------------------------------------------------------------------------------ teacher weights
def test_truncated_teacher_weights_are_one_line_naming_the_file(env, tmp_path):
    bad = Path(shutil.copytree(env / "teacher", tmp_path / "teacher"))
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    cfg = make_cfg(env, tmp_path, f"teacher.path={bad}")
    with pytest.raises(ConceptLMError, match="model.safetensors: truncated or damaged") as err:
        label(cfg)
    assert "\n" not in str(err.value)
    assert not (cfg.run_dir / "labels").exists()


class _Payload:
    """Pickles as a call of ``print``: what weights-only unpickling must refuse."""

    def __reduce__(self):
        return (print, ("PICKLE EXECUTED",))


def test_a_pickle_teacher_bin_is_refused_without_running_it(env, tmp_path, capsys):
    bad = Path(shutil.copytree(env / "teacher", tmp_path / "teacher"))
    from safetensors.torch import load_file

    state = load_file(str(bad / "model.safetensors"))
    (bad / "model.safetensors").unlink()
    torch.save({**state, "payload": _Payload()}, bad / "pytorch_model.bin")
    cfg = make_cfg(env, tmp_path, f"teacher.path={bad}")
    with pytest.raises(ConceptLMError, match="pytorch_model.bin cannot be loaded safely.*convert .* to safetensors") \
            as err:
        label(cfg)
    assert "\n" not in str(err.value) and "PICKLE EXECUTED" not in capsys.readouterr().out
    assert not (cfg.run_dir / "labels").exists()


# ------------------------------------------------------------------------------------------------ corpus
def test_a_lone_surrogate_in_a_jsonl_corpus_is_one_line_naming_file_line_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "a fine document"}) + "\n" + json.dumps({"text": "bad \ud800 here"}) + "\n")
    assert "\\ud800" in path.read_text()  # a valid JSON escape, an invalid string
    with pytest.raises(DataError, match=r"docs.jsonl:2: field 'text': lone surrogate U\+D800 at character 4"):
        read_documents(path)


def test_n_documents_cutting_a_file_corpus_is_logged_with_the_count(tmp_path, caplog):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n\n" for i in range(5)))
    (folder / "b.txt").write_text("one\nstill one\n\ntwo\n\n\nthree\n")
    with caplog.at_level(logging.WARNING, logger="conceptlm.cocomix.corpus"):
        assert read_documents(folder, limit=3) == ["doc 0", "doc 1", "doc 2"]
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "corpus.n_documents=3" in msg and "leaving out 5 more" in msg and "all 8" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="conceptlm.cocomix.corpus"):
        assert len(read_documents(folder, limit=6)) == 6
        assert read_documents(folder, limit=8)[-1] == "three" and len(read_documents(folder)) == 8
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["corpus.n_documents=6"]
    assert "leaving out 2 more" in caplog.records[0].getMessage()


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_prints_each_refusal_as_one_line(env, tmp_path, capsys):
    base = ["cocomix", "label", "--config", CONFIG]
    rc, err = run_cli(capsys, *base, *overrides(env, tmp_path / "a", f"labels.k_attr={K + 1}",
                                                f"cocomix.k_attr={K + 1}"))
    assert_one_line_cli_error(rc, err, "labels.k_attr")

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} \ud800"}) + "\n" for i in range(30)))
    rc, err = run_cli(capsys, *base, *overrides(env, tmp_path / "b", f"corpus.source={docs}"))
    assert_one_line_cli_error(rc, err, "docs.jsonl:1", "lone surrogate")

    bad = Path(shutil.copytree(env / "teacher", tmp_path / "teacher"))
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:1000])
    rc, err = run_cli(capsys, *base, *overrides(env, tmp_path / "c", f"teacher.path={bad}"))
    assert_one_line_cli_error(rc, err, "model.safetensors")
    for sub in ("a", "b", "c"):
        assert not (tmp_path / sub / "cocomix_tiny" / "labels").exists()


def test_the_pipeline_trains_no_sae_when_one_is_given(env, tmp_path):
    from conceptlm.cocomix.pipeline import _Stages

    write, name = WRITERS["sparsify"]
    foreign = tmp_path / name
    write(foreign)
    cfg = make_cfg(env, tmp_path, f"labels.sae_path={foreign}", "run.name=given")
    stages = _Stages(cfg, None)
    assert stages.sae() == {"sae": str(foreign), "skipped": True, "given": True}
    assert not (tmp_path / "given" / "sae").exists()
    assert stages.labeler().sae.n_latents == C  # the given SAE labels (online path), its settings checked


def test_online_labels_check_the_sae_settings_too(env, tmp_path):
    from conceptlm.cocomix.pipeline import _Stages

    cfg = make_cfg(env, tmp_path, f"sae.n_latents={C + 1}", f"student.n_concepts={C + 1}", "pipeline.labels=online")
    with pytest.raises(ConfigError, match="sae.n_latents"):
        _Stages(cfg, None).labeler()


def test_a_key_given_twice_in_a_corpus_record_is_an_error(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a b c"}\n{"text": "x", "text": "y"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"c.jsonl:2: field 'text': duplicate key 'text'"):
        load_documents(CorpusSection(source=str(path)))
