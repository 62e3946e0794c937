"""Numbers you can trust (issue 19) for the LCM workflow: decoders learn from training documents only, generate /
evaluate check the encoder, the prepared folder and the decoder they read, prepare reuses a shard only when its
content fingerprint matches, shards are checksummed when read, moved folders stay valid, and the failures a user
meets (a truncated bank, a full disk, a model folder with custom code, a second prepare) are one-line errors that
leave nothing half-written behind."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest

from conceptlm.core.artifact import digest, file_sha256, fingerprint_of, read_manifest
from conceptlm.core.config import load_config
from conceptlm.core.errors import ConceptLMError, ConfigError, DataError, RunLockedError
from conceptlm.core.lock import RunLock
from conceptlm.lcm.config import DecoderTrainConfig, DocsSection, EncoderSection, LCMConfig, SegmentSection
from conceptlm.lcm.data import prepare as prep_mod
from conceptlm.lcm.data.documents import iter_documents
from conceptlm.lcm.data.encoders import get_encoder, identity_fingerprint
from conceptlm.lcm.data.prepare import prepare as prepare_docs
from conceptlm.lcm.data.segment import get_segmenter
from conceptlm.lcm.data.store import EmbeddedDocuments, assign_split
from conceptlm.lcm.decoder_train import train_decoder as train_decoder_only
from conceptlm.lcm.decoders import decoder_manifest, load_decoder
from conceptlm.lcm.recipe import evaluate, generate, prepare, train, train_decoder
from tests.lcm.test_encoders import make_tiny_st_dir
from tests.lcm.test_prepare import _cfg as prepare_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny sentence-transformers folders (dim 32) with different weights: encoder A and encoder B."""
    root = tmp_path_factory.mktemp("encoders")
    return make_tiny_st_dir(root / "a", seed=0), make_tiny_st_dir(root / "b", seed=1)


def _overrides(root: Path, encoder: Path, *extra: str) -> list[str]:
    return [f"run.out_dir={root}", "run.name=lcm", f"prepare.out_dir={root}/data", "docs.n_documents=40",
            "prepare.val_fraction=0.3", "prepare.shard_size=16", "prepare.max_sentences=16", "segment.backend=rule",
            f"encoder.name={encoder}", "encoder.batch_size=32", "lcm.dim=32", "lcm.d_model=32", "lcm.n_layers=1",
            "lcm.n_heads=2", "lcm.d_ff=64", "lcm.dropout=0", "lcm.max_sentences=16", "lcm_data.source=prepared",
            "decoder.kind=retrieval", "decoder_train.eval_sentences=4", "decoder_train.decode_eval=4",
            "train.max_steps=3", "train.micro_batch_size=4", "train.eval_every=0", "schedule.warmup_steps=1",
            "train.progress=false", "evaluate.documents=4", "evaluate.generate_documents=2",
            "evaluate.fragility_sentences=0", "evaluate.mi_model=null", "generate.documents=1",
            "generate.max_new_sentences=2", *extra]


def _config(root: Path, encoder: Path, *extra: str) -> LCMConfig:
    return load_config(LCMConfig, None, _overrides(root, encoder, *extra))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, encoders):
    """prepare -> train-decoder (retrieval) -> train (3 steps) with encoder A."""
    root = tmp_path_factory.mktemp("trust")
    cfg = _config(root, encoders[0])
    prepare(cfg)
    train_decoder(cfg)
    res = train(cfg)
    return cfg, res


def _sentences(folder: Path, split: str) -> set[str]:
    docs = EmbeddedDocuments(folder, split)
    return {s for i in range(len(docs)) for s in docs[i]["sentences"]}


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# ------------------------------------------------------------------------------------------------ 1. decoder split
def test_the_decoder_learns_from_training_documents_only(pipeline, encoders):
    cfg, _ = pipeline
    bank = load_decoder(cfg.decoder_dir)
    train_s, val_s = _sentences(cfg.data_dir, "train"), _sentences(cfg.data_dir, "validation")
    validation_only = val_s - train_s
    assert len(validation_only) >= 5  # the test means something: validation documents have their own sentences
    assert not set(bank.sentences) & validation_only
    assert set(bank.sentences) <= train_s
    # the manifest records what it learned from: the prepared folder's train split, its sentences and encoder
    m = decoder_manifest(cfg.decoder_dir)
    assert m["kind"] == "lcm.decoder"
    assert m["data"]["source"] == "prepared" and m["data"]["split"] == "train"
    assert m["data"]["prepared"] == fingerprint_of(cfg.data_dir) == m["inputs"]["prepared"]
    assert (m["data"]["val_fraction"], m["data"]["split_seed"]) == (0.3, 0)
    assert m["inputs"]["sentences"] == digest(bank.sentences)
    assert m["inputs"]["encoder"] == identity_fingerprint(get_encoder(cfg.encoder))
    assert m["encoder"]["fingerprint"] == get_encoder(cfg.encoder).identity()["fingerprint"]
    bank_dir = cfg.decoder_dir / "decoder"
    assert m["files"]["bank.safetensors"]["sha256"] == file_sha256(bank_dir / "bank.safetensors")


def test_without_a_prepared_folder_the_decoder_uses_prepares_split_rule(tmp_path, encoders):
    docs = DocsSection(n_documents=30, seed=3)
    ov = [f"run.out_dir={tmp_path}", "run.name=dec", "decoder.kind=retrieval", f"encoder.name={encoders[0]}",
          "docs.n_documents=30", "docs.seed=3", "prepare.val_fraction=0.4", "prepare.split_seed=2",
          "decoder_train.eval_sentences=0", "decoder_train.decode_eval=0", "train.progress=false"]
    res = train_decoder_only(load_config(DecoderTrainConfig, None, ov))
    bank = load_decoder(res.checkpoint)
    seg = get_segmenter(SegmentSection())
    by_split: dict[str, set[str]] = {"train": set(), "validation": set()}
    for doc_id, text in iter_documents(docs):
        by_split[assign_split(doc_id, 0.4, 2)].update(seg.split(text))
    validation_only = by_split["validation"] - by_split["train"]
    assert validation_only and set(bank.sentences) == by_split["train"]
    assert decoder_manifest(res.checkpoint)["data"] == {"source": "docs", "split": "train", "val_fraction": 0.4,
                                                         "split_seed": 2}


def test_a_trained_prefix_decoder_carries_its_manifest_and_an_identical_bank_is_reused(pipeline, tmp_path):
    from tests.lcm.test_decoder_train import generated_sentences, overrides
    from tests.lcm.test_decoders import BagEncoder

    enc, sentences = BagEncoder(), generated_sentences(40)
    ov = overrides(tmp_path, "prefix", **{"train.max_steps": 2, "schedule.warmup_steps": 1,
                                          "decoder_train.decode_eval": 0})
    res = train_decoder_only(load_config(DecoderTrainConfig, None, ov), sentences=sentences, encoder=enc,
                             data={"source": "given", "split": "given", "note": "test"})
    m = decoder_manifest(res.checkpoint)  # the checkpoint's model/ export
    assert m["kind"] == "lcm.decoder" and m["data"]["note"] == "test" and m["settings"]["decoder"]["kind"] == \
        "prefix_lm"
    assert m["inputs"]["encoder"] == identity_fingerprint(enc) and "projector.safetensors" in m["files"]
    # train-decoder again with the same sentences, encoder and settings: the bank is reused, not rebuilt
    cfg, _ = pipeline
    bank = cfg.decoder_dir / "decoder" / "bank.safetensors"
    stamp = bank.stat().st_mtime_ns
    train_decoder(cfg)
    assert bank.stat().st_mtime_ns == stamp


def test_generate_and_evaluate_refuse_a_decoder_that_learned_from_validation_documents(pipeline, encoders,
                                                                                        tmp_path):
    cfg, res = pipeline
    root = cfg.run_dir.parent
    leaky_cfg = _config(root, encoders[0], "run.name=leaky", "decoder_train.split=all")
    train_decoder(leaky_cfg)
    leaky = load_decoder(leaky_cfg.decoder_dir)
    val_only = _sentences(cfg.data_dir, "validation") - _sentences(cfg.data_dir, "train")
    assert set(leaky.sentences) & val_only  # split=all: validation sentences in the bank, as recorded
    assert decoder_manifest(leaky_cfg.decoder_dir)["data"]["split"] == "all"
    use_leaky = _config(root, encoders[0], f"decoder.path={leaky_cfg.decoder_dir}")
    ckpt = str(res.checkpoint)
    for verb in (evaluate, generate):
        with pytest.raises(ConfigError, match=r"decoder_train.split=all") as err:
            verb(use_leaky, checkpoint=ckpt)
        _one_line(err)
    # a decoder without a manifest (an older version's, or saved through the API): which documents it saw is unknown
    unknown = tmp_path / "unknown"
    shutil.copytree(cfg.decoder_dir / "decoder", unknown)
    (unknown / "artifact.json").unlink()
    with pytest.raises(ConfigError, match="no artifact.json") as err:
        evaluate(_config(root, encoders[0], f"decoder.path={unknown}"), checkpoint=ckpt)
    _one_line(err)
    # generating from a prompt reads no validation document: any decoder will do
    out = generate(_config(root, encoders[0], f"decoder.path={leaky_cfg.decoder_dir}",
                           "generate.prompt='Anna found a map. She walked to the harbor.'"), checkpoint=ckpt,
                   output=str(tmp_path / "g.json"))
    assert out["documents"] == 1


# ------------------------------------------------------------------------------------------------ 2. encoder check
def test_generate_and_evaluate_refuse_another_encoder_than_the_runs(pipeline, encoders, tmp_path):
    cfg, res = pipeline
    other = ["evaluate.round_trip=false", "evaluate.generate_documents=0"]  # no decoder needed: only the run's check
    with pytest.raises(ConfigError, match=r"encoder.name.*another sentence encoder") as err:
        evaluate(_config(cfg.run_dir.parent, encoders[1], *other))
    assert str(res.checkpoint) in _one_line(err)
    with pytest.raises(ConfigError, match=r"another sentence encoder") as err:
        generate(_config(cfg.run_dir.parent, encoders[1]), output=str(tmp_path / "g.json"))
    _one_line(err)
    # the same encoder with another truncation is another embedding space too
    with pytest.raises(ConfigError, match="max_seq_length"):
        evaluate(_config(cfg.run_dir.parent, encoders[0], "encoder.max_seq_length=8", *other))
    # what the checkpoint records: the encoder's identity and the prepared folder's content fingerprint
    recorded = json.loads((res.checkpoint / "artifacts" / "encoder" / "encoder.json").read_text())
    assert recorded["fingerprint"] == get_encoder(cfg.encoder).identity()["fingerprint"]
    prepared = json.loads((res.checkpoint / "artifacts" / "prepared" / "prepared.json").read_text())
    assert prepared["fingerprint"] == fingerprint_of(cfg.data_dir)


def test_other_prepared_documents_are_refused_and_a_moved_folder_is_the_same(pipeline, encoders, tmp_path):
    cfg, res = pipeline
    root = cfg.run_dir.parent
    other = tmp_path / "other"
    prepare(_config(root, encoders[0], f"prepare.out_dir={other}", "docs.seed=5"))
    with pytest.raises(ConfigError, match="trained on other prepared documents") as err:
        evaluate(_config(root, encoders[0], f"lcm_data.source={other}"), output=str(tmp_path / "e.json"))
    _one_line(err)
    # moved (copied, then renamed) prepared folder and decoder: identity by content, paths relative
    moved = tmp_path / "moved-data"
    shutil.copytree(cfg.data_dir, tmp_path / "copy")
    (tmp_path / "copy").rename(moved)
    dec = tmp_path / "moved-decoder"
    shutil.copytree(cfg.decoder_dir, tmp_path / "dcopy")
    (tmp_path / "dcopy").rename(dec)
    assert fingerprint_of(moved) == fingerprint_of(cfg.data_dir) == EmbeddedDocuments(moved).fingerprint
    moved_cfg = _config(root, encoders[0], f"lcm_data.source={moved}", f"decoder.path={dec}")
    ev = evaluate(moved_cfg, output=str(tmp_path / "moved.json"))
    assert ev["documents"] == 4 and ev["teacher_forced"]["l2"] > 0 and ev["generation"]["documents"] == 2
    assert generate(moved_cfg, output=str(tmp_path / "g.json"))["documents"] == 1
    # prepare on the moved folder: everything reused, nothing rewritten
    again = prepare(_config(root, encoders[0], f"prepare.out_dir={moved}"))
    assert (again["shards_reused"], again["shards_written"]) == (3, 0)


# ------------------------------------------------------------------------------------------------ 3. stale shards
def _with_changed_text(doc_ids: set[str], new_text=None):
    real = iter_documents

    def fake(section, **kw):
        for doc_id, text in real(section, **kw):
            yield doc_id, (new_text(text) if new_text else text + " A brand new sentence appears here.") \
                if doc_id in doc_ids else text
    return fake


def test_prepare_refuses_a_shard_whose_documents_changed_and_rebuilds_it_on_request(encoders, tmp_path,
                                                                                   monkeypatch):
    out = tmp_path / "out"
    first = prepare_docs(prepare_cfg(encoders[0], out))
    assert first["shards_written"] == 5
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    ids = [i for i, _ in iter_documents(DocsSection(n_documents=23, seed=1))]
    changed = ids[7]  # in shard-00001 (5 documents per shard)
    monkeypatch.setattr(prep_mod, "iter_documents", _with_changed_text({changed}))
    with pytest.raises(ConceptLMError, match=rf"shard-00001\.parquet: the text of document '{changed}' changed.*"
                                             r"prepare\.on_change=rebuild") as err:
        prepare_docs(prepare_cfg(encoders[0], out))
    _one_line(err)
    # the refused run changed nothing: the folder is still complete and holds the old sentences
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    old = EmbeddedDocuments(out)
    assert "A brand new sentence appears here." not in old[7]["sentences"]
    cfg = prepare_cfg(encoders[0], out, on_change="rebuild")
    summary = prepare_docs(cfg)
    assert (summary["shards_reused"], summary["shards_written"], summary["shards_rebuilt"]) == (4, 1, 1)
    ds = EmbeddedDocuments(out)
    assert ds[7]["id"] == changed and "A brand new sentence appears here." in ds[7]["sentences"]
    artifact = read_manifest(out)
    assert artifact["kind"] == "lcm.prepared" and artifact["fingerprint"] != first["fingerprint"]
    for name in ("shard-00000.parquet", "shard-00001.parquet", "normalizer.json"):
        assert artifact["files"][name]["sha256"] == file_sha256(out / name)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["inputs"] for s in manifest["shards"]] == [s["inputs"] for s in artifact["shards"]]
    assert before["shard-00000.parquet"] == (out / "shard-00000.parquet").read_bytes()  # untouched shards reused
    assert before["shard-00001.parquet"] != (out / "shard-00001.parquet").read_bytes()


def _rewrite_vectors(shard: Path, split: str) -> None:
    """Replace the vectors of the first ``split`` document of ``shard`` by large constants."""
    import numpy as np
    import pyarrow.parquet as pq

    from conceptlm.lcm.data.store import documents_table, read_shard

    data = read_shard(shard)
    flat, offsets = data["vectors"]
    docs = [{"id": data["id"][r], "split": data["split"][r], "text": data["text"][r],
             "sentences": data["sentences"][r], "vectors": flat[offsets[r]:offsets[r + 1]].astype(np.float32)}
            for r in range(len(data["id"]))]
    row = next(r for r, d in enumerate(docs) if d["split"] == split)
    docs[row]["vectors"] = docs[row]["vectors"] * 0 + 50.0
    pq.write_table(documents_table(docs, flat.shape[1]), shard)


def test_the_normalizer_sees_training_vectors_only_and_warns_when_fitted_on_few(encoders, tmp_path, caplog):
    from conceptlm.lcm.data.normalizer import RobustNormalizer

    out = tmp_path / "a"
    cfg = prepare_cfg(encoders[0], out)
    with caplog.at_level(logging.WARNING, logger="conceptlm.lcm.data.normalizer"):
        prepare_docs(cfg)
    warned = [r.getMessage() for r in caplog.records if "normalizer fitted on only" in r.getMessage()]
    saved = RobustNormalizer.from_pretrained(out)
    assert len(warned) == 1 and f"only {saved.n_fit} training vectors" in warned[0] and str(out) in warned[0]
    records = json.loads((out / "manifest.json").read_text())["shards"]
    shards = sorted(out.glob("shard-*.parquet"))
    with_validation = next(p for p, r in zip(shards, records) if r["n_train_documents"] < r["n_documents"])
    _rewrite_vectors(with_validation, "validation")  # a validation vector changes: the fit does not
    refit = prep_mod._fit_normalizer(out, records, 32, cfg.prepare)
    assert refit.n_fit == saved.n_fit
    assert refit.center.equal(saved.center) and refit.scale.equal(saved.scale)
    _rewrite_vectors(with_validation, "train")  # a training vector changes: the fit does
    moved = prep_mod._fit_normalizer(out, records, 32, cfg.prepare)
    assert not (moved.center.equal(saved.center) and moved.scale.equal(saved.scale))


# ------------------------------------------------------------------------------------------------ 4. checksums
def test_a_damaged_shard_is_a_one_line_error_naming_it_when_first_read(encoders, tmp_path):
    out = tmp_path / "out"
    prepare_docs(prepare_cfg(encoders[0], out, compression="none"))
    ds = EmbeddedDocuments(out)
    target = next(i for i in range(len(ds)) if ds._shard_of[i] == 2)  # the first document of shard 2
    sentence = ds[target]["sentences"][0]
    shard = out / "shard-00002.parquet"
    raw = bytearray(shard.read_bytes())
    pos = raw.find(sentence.encode())
    assert pos >= 0
    raw[pos + 1] ^= 0x01  # one flipped bit in a stored sentence (still valid UTF-8)
    shard.write_bytes(bytes(raw))
    damaged = EmbeddedDocuments(out)  # the index columns are intact: opening is fine
    assert damaged[0]["sentences"] == ds[0]["sentences"]  # shard 0 is intact and read
    with pytest.raises(DataError, match=r"shard-00002\.parquet: checksum mismatch.*on_change=rebuild") as err:
        damaged[target]
    _one_line(err)
    # prepare finds it too: refused by default, re-encoded on request
    with pytest.raises(ConceptLMError, match=r"shard-00002\.parquet: damaged"):
        prepare_docs(prepare_cfg(encoders[0], out, compression="none"))
    summary = prepare_docs(prepare_cfg(encoders[0], out, compression="none", on_change="rebuild"))
    assert summary["shards_rebuilt"] == 1 and EmbeddedDocuments(out)[target]["sentences"][0] == sentence


# ------------------------------------------------------------------------------------------------ 5. hardening
def test_a_truncated_bank_is_a_one_line_error(pipeline, tmp_path):
    cfg, _ = pipeline
    for keep_manifest in (True, False):
        bank = tmp_path / f"bank-{keep_manifest}"
        shutil.copytree(cfg.decoder_dir / "decoder", bank)
        data = (bank / "bank.safetensors").read_bytes()
        (bank / "bank.safetensors").write_bytes(data[:len(data) // 2])
        if not keep_manifest:
            (bank / "artifact.json").unlink()
        with pytest.raises(ConfigError, match=r"bank\.safetensors.*(truncated|damaged)") as err:
            load_decoder(bank)
        _one_line(err)


def _full_disk_after(n_ok: int, monkeypatch):
    import pyarrow.parquet as pq

    real, calls = pq.write_table, []

    def write_table(table, where, **kw):
        calls.append(where)
        if len(calls) > n_ok:
            Path(where).write_bytes(b"PAR1 half a shard")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", write_table)


def test_a_full_disk_during_prepare_is_one_line_and_leaves_nothing_half_written(encoders, tmp_path, monkeypatch):
    fresh = tmp_path / "fresh"
    _full_disk_after(0, monkeypatch)
    with pytest.raises(DataError, match=r"shard-00000\.parquet: cannot write \(No space left on device\)") as err:
        prepare_docs(prepare_cfg(encoders[0], fresh))
    _one_line(err)
    assert not fresh.exists()  # it created the folder and finished no shard: nothing left
    monkeypatch.undo()
    out = tmp_path / "out"
    _full_disk_after(2, monkeypatch)
    with pytest.raises(DataError, match=r"shard-00002\.parquet: cannot write"):
        prepare_docs(prepare_cfg(encoders[0], out))
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == [
        "prepare_state.json", "shard-00000.parquet", "shard-00001.parquet"]  # complete shards only, no temporaries
    monkeypatch.undo()
    summary = prepare_docs(prepare_cfg(encoders[0], out))
    assert (summary["shards_reused"], summary["shards_written"]) == (2, 3)


def test_an_encoder_folder_with_custom_code_is_refused(encoders, tmp_path):
    auto = tmp_path / "auto"
    shutil.copytree(encoders[0], auto)
    config = json.loads((auto / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (auto / "config.json").write_text(json.dumps(config))
    (auto / "modeling_evil.py").write_text("raise SystemExit('ran code from a model folder')\n")
    with pytest.raises(ConfigError, match=r"encoder.name.*trust_remote_code.*auto_map") as err:
        get_encoder(EncoderSection(name=str(auto)))
    _one_line(err)
    module = tmp_path / "module"
    shutil.copytree(encoders[0], module)
    modules = json.loads((module / "modules.json").read_text())
    modules.append({"idx": len(modules), "name": "x", "path": "x", "type": "my_package.CustomLayer"})
    (module / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match=r"trust_remote_code.*my_package\.CustomLayer"):
        get_encoder(EncoderSection(name=str(module)))
    get_encoder(EncoderSection(name=str(encoders[0])))  # the plain folder still loads


def test_prepare_takes_the_folder_lock_and_a_refused_run_leaves_nothing(encoders, tmp_path):
    out = tmp_path / "out"
    with RunLock(out):
        with pytest.raises(RunLockedError, match="in use by pid") as err:
            prepare_docs(prepare_cfg(encoders[0], out))
        _one_line(err)
        assert [p.name for p in out.iterdir()] == [".lock"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    nothing = tmp_path / "nothing"
    with pytest.raises(ConceptLMError, match="no documents to prepare"):
        prepare_docs(prepare_cfg(encoders[0], nothing, docs=DocsSection(source=str(empty)), skip_bad=True))
    assert not nothing.exists()


def test_a_key_given_twice_in_a_document_record_is_an_error(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "One. Two."}\n{"text": "first", "text": "second"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"docs.jsonl:2: field 'text': duplicate key 'text'"):
        list(iter_documents(DocsSection(source=str(path))))


def test_the_same_documents_at_another_path_reuse_every_shard(tmp_path, encoders):
    src = tmp_path / "a" / "docs.jsonl"
    src.parent.mkdir()
    src.write_text("".join(json.dumps({"text": f"Doc {i} starts here. It has a second sentence. And a third one."})
                           + "\n" for i in range(12)), encoding="utf-8")
    moved = tmp_path / "b" / "docs.jsonl"
    moved.parent.mkdir()
    shutil.copy(src, moved)
    first = prepare(_config(tmp_path, encoders[0], f"docs.source={src}", "prepare.shard_size=5"))
    again = prepare(_config(tmp_path, encoders[0], f"docs.source={moved}", "prepare.shard_size=5"))
    assert first["shards_written"] == 3 and again["shards_reused"] == 3 and again["shards_written"] == 0
    assert again["fingerprint"] == first["fingerprint"]


def test_train_decoder_refuses_to_replace_a_bank_of_other_sentences_unless_asked(pipeline, encoders):
    cfg, _ = pipeline
    bank = cfg.decoder_dir / "decoder"
    before = read_manifest(bank)["fingerprint"]
    changed = _config(cfg.run_dir.parent, encoders[0], "decoder_train.max_sentences=20")
    with pytest.raises(ConceptLMError, match=r"decoder_train.max_sentences \d+ -> 20.*decoder_train.on_change=rebuild"
                       ) as err:
        train_decoder(changed)
    _one_line(err)
    assert read_manifest(bank)["fingerprint"] == before  # nothing replaced
    train_decoder(_config(cfg.run_dir.parent, encoders[0], "decoder_train.max_sentences=20",
                          "decoder_train.on_change=rebuild"))
    assert read_manifest(bank)["fingerprint"] != before and len(load_decoder(cfg.decoder_dir).sentences) == 20
    train_decoder(_config(cfg.run_dir.parent, encoders[0], "decoder_train.on_change=rebuild"))  # put it back
    assert read_manifest(bank)["fingerprint"] == before
