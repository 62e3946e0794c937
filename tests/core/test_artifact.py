"""The artifact manifest: identity by content, reuse only on an equal fingerprint, a one-line diff otherwise."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from conceptlm.core import artifact as A
from conceptlm.core.errors import DataError


def _identity(d_model: int = 32, teacher: str = "a" * 64) -> A.Identity:
    return A.Identity("test.stage", settings={"student": {"d_model": d_model, "n_layers": 2}},
                      inputs={"teacher": teacher})


def _made(tmp_path, identity=None):
    out = tmp_path / "stage"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"\x00\x01\x02")
    (out / "sub").mkdir()
    (out / "sub" / "x.txt").write_text("hello")
    A.write_manifest(out, identity or _identity())
    return out


def test_fingerprint_is_sha256_of_the_canonical_identity():
    ident = _identity()
    text = json.dumps({"format": 1, "inputs": {"teacher": "a" * 64}, "kind": "test.stage",
                       "settings": {"student": {"d_model": 32, "n_layers": 2}}}, sort_keys=True,
                      separators=(",", ":"))
    assert ident.fingerprint == hashlib.sha256(text.encode()).hexdigest()
    # key order does not matter, values do
    same = A.Identity("test.stage", settings={"student": {"n_layers": 2, "d_model": 32}}, inputs={"teacher": "a" * 64})
    assert same.fingerprint == ident.fingerprint
    assert _identity(d_model=48).fingerprint != ident.fingerprint
    assert _identity(teacher="b" * 64).fingerprint != ident.fingerprint


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    out = _made(tmp_path)
    m = A.read_manifest(out)
    assert m["fingerprint"] == _identity().fingerprint
    assert set(m["files"]) == {"weights.bin", "sub/x.txt"}  # relative names; the manifest itself is not listed
    assert m["files"]["weights.bin"] == {"size": 3, "sha256": hashlib.sha256(b"\x00\x01\x02").hexdigest()}


def test_decide_build_reuse_refuse_rebuild(tmp_path):
    assert A.decide(tmp_path / "nothing", _identity()) == "build"
    out = _made(tmp_path)
    assert A.decide(out, _identity()) == "reuse"
    with pytest.raises(A.StaleArtifactError) as e:
        A.decide(out, _identity(d_model=48), what="students/ntp-s0", option="pipeline.on_change")
    msg = str(e.value)
    assert msg == "students/ntp-s0: student.d_model 32 -> 48; rerun with pipeline.on_change=rebuild"
    assert "\n" not in msg
    assert A.decide(out, _identity(d_model=48), on_change="rebuild") == "rebuild"


def test_a_changed_input_is_named(tmp_path):
    out = _made(tmp_path)
    with pytest.raises(A.StaleArtifactError, match=r"input teacher changed \(aaaaaaaaaaaa -> bbbbbbbbbbbb\)"):
        A.decide(out, _identity(teacher="b" * 64))


def test_a_folder_without_manifest_is_not_reused(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "sae.safetensors").write_bytes(b"x")
    with pytest.raises(A.StaleArtifactError, match="no artifact.json"):
        A.decide(out, _identity())


def test_a_damaged_file_is_not_reused_and_verify_names_it(tmp_path):
    out = _made(tmp_path)
    data = bytearray((out / "weights.bin").read_bytes())
    data[1] ^= 0x01  # one flipped bit, same size
    (out / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(A.StaleArtifactError, match="weights.bin: checksum mismatch"):
        A.decide(out, _identity())
    with pytest.raises(DataError, match="weights.bin: checksum mismatch"):
        A.verify_files(out)
    (out / "weights.bin").write_bytes(b"\x00")
    assert "1 bytes, the manifest says 3" in A.damaged_file(out)


def test_moving_the_folder_keeps_it_valid(tmp_path):
    out = _made(tmp_path)
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    assert A.decide(moved, _identity()) == "reuse"
    assert A.require(moved, kind="test.stage")["fingerprint"] == _identity().fingerprint
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    assert A.files_digest(copy) == A.files_digest(moved)  # names are relative: the place is not identity
    (copy / "sub" / "x.txt").write_text("hellO")
    assert A.files_digest(copy) != A.files_digest(moved)


def test_require_checks_kind(tmp_path):
    out = _made(tmp_path)
    with pytest.raises(A.StaleArtifactError, match="holds a 'test.stage' artifact, expected 'lcm.decoder'"):
        A.require(out, kind="lcm.decoder")
    with pytest.raises(A.StaleArtifactError, match="no artifact.json"):
        A.fingerprint_of(tmp_path)


def test_tensors_digest_is_by_content_not_by_object():
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}
    b = {"b": torch.zeros(3), "w": torch.arange(6, dtype=torch.float32).reshape(2, 3).clone()}
    assert A.tensors_digest(a) == A.tensors_digest(b)
    c = dict(b, w=b["w"].clone())
    c["w"][0, 0] = 1e-30  # a re-initialised tensor of the same shape
    assert A.tensors_digest(c) != A.tensors_digest(a)
    assert A.tensors_digest({"w": a["w"].reshape(3, 2)}) != A.tensors_digest({"w": a["w"]})  # shape counts
    assert A.tensors_digest({"w": a["w"].double()}) != A.tensors_digest({"w": a["w"]})  # dtype counts
