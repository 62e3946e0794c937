"""Artifact identity: every stage output carries a manifest of exactly what made it.

A stage output (a tokenizer, a teacher, an SAE, a label cache, prepared shards, a normalizer, a decoder, a run, a
report) is a folder with ``artifact.json``::

    {"kind": "cocomix.sae", "format": 1,
     "settings": {...},                  # the stage's resolved settings that shape the result
     "inputs": {"teacher": "3f2a...", ...},  # content fingerprints of what it read (weights, data), never paths
     "fingerprint": "9c1d...",           # sha256 over kind, format, settings and inputs
     "files": {"sae.safetensors": {"size": 1234, "sha256": "..."}, ...}}   # paths relative to the folder

The stage computes the :class:`Identity` it *would* produce now; :func:`decide` compares it with the manifest on
disk and answers ``"reuse"`` (the fingerprints are equal), ``"build"`` (nothing there yet) or, when they differ,
either refuses with one line naming what changed (``on_change="refuse"``, the default) or answers ``"rebuild"``
(``on_change="rebuild"``). A consumer reads the producer's fingerprint with :func:`fingerprint_of` and records it
among its own inputs, so a change anywhere upstream changes every fingerprint downstream.

Paths are stored relative to the folder, so a moved, renamed or symlinked artifact stays valid; identity is by
content. :func:`verify_files` checks sizes and sha256 (cost: one read of each file, about 1 GB/s).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from conceptlm.core.errors import ConceptLMError, DataError
from conceptlm.core.io import atomic_write_text

__all__ = ["ARTIFACT_FILE", "Identity", "StaleArtifactError", "canonical_json", "digest", "file_sha256",
           "files_digest", "tensors_digest", "write_manifest", "begin", "is_complete", "read_manifest",
           "fingerprint_of", "diff_identity", "decide", "file_listing", "damaged_file", "listed_file_problem",
           "verify_files", "require"]

log = logging.getLogger(__name__)

ARTIFACT_FILE = "artifact.json"
OnChange = Literal["refuse", "rebuild"]
_CHUNK = 1 << 22


class StaleArtifactError(ConceptLMError, RuntimeError):
    """An existing output was made from other settings or inputs than the stage would use now."""


# ------------------------------------------------------------------------------------------------ digests
def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal data give equal text (tuples become lists)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_default)


def _default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-able")


def digest(obj: Any) -> str:
    """sha256 (hex) of :func:`canonical_json` of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8", "surrogatepass")).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def files_digest(root: str | Path, names: Iterable[str] | None = None) -> str:
    """One sha256 over files under ``root``: their relative names and bytes (all regular files, sorted, when
    ``names`` is None; ``artifact.json`` and hidden temporaries excluded). Moving the folder does not change it."""
    root = Path(root)
    rels = sorted(names) if names is not None else _list_files(root)
    h = hashlib.sha256()
    for rel in rels:
        h.update(f"{rel}\0{file_sha256(root / rel)}\0".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def tensors_digest(tensors: Mapping[str, Any]) -> str:
    """sha256 over named tensors (name, dtype, shape and bytes, in name order): the identity of weights by
    content, independent of the file format that holds them."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _list_files(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".tmp-", ".old-")))
        for name in filenames:
            if name.startswith((".tmp-", ".old-", ".lock")) or name == ARTIFACT_FILE:
                continue
            out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(out)


# ------------------------------------------------------------------------------------------------ identity
@dataclass
class Identity:
    """What made (or would make) an artifact.

    Args:
        kind: the stage, e.g. ``"lcm.prepared"``; a manifest of another kind never matches.
        format: the on-disk format version (bump it when the layout or the meaning of the files changes).
        settings: the resolved settings that shape the result (JSON-able; paths only where they are content-free
            names, never as identity of an input).
        inputs: name -> content fingerprint of each input (another artifact's :func:`fingerprint_of`, a
            :func:`files_digest`, a :func:`tensors_digest`, a hash of data records).
    """

    kind: str
    format: int = 1
    settings: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return digest({"kind": self.kind, "format": self.format, "settings": self.settings, "inputs": self.inputs})

    def as_dict(self) -> dict[str, Any]:
        return json.loads(canonical_json({"kind": self.kind, "format": self.format, "settings": self.settings,
                                          "inputs": self.inputs}))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: obj}


def _short(v: Any) -> str:
    text = json.dumps(v, ensure_ascii=False, default=str) if not isinstance(v, str) else v
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12]  # a digest
    return text if len(text) <= 40 else text[:37] + "..."


def diff_identity(old: Mapping[str, Any], new: Identity, *, limit: int = 4) -> list[str]:
    """What differs between a stored manifest and ``new``, as ``"settings.student.d_model 32 -> 48"`` /
    ``"input teacher changed (3f2a… -> 9c1d…)"`` strings (at most ``limit`` plus a count of the rest)."""
    changes: list[str] = []
    if old.get("kind") != new.kind:
        changes.append(f"kind {old.get('kind')} -> {new.kind}")
    if old.get("format") != new.format:
        changes.append(f"format {old.get('format')} -> {new.format}")
    a, b = _flatten(old.get("settings") or {}), _flatten(new.as_dict()["settings"])
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            changes.append(f"{key} {_short(a.get(key, '<unset>'))} -> {_short(b.get(key, '<unset>'))}")
    ia, ib = _flatten(old.get("inputs") or {}), _flatten(new.as_dict()["inputs"])
    for key in sorted(set(ia) | set(ib)):
        if ia.get(key) != ib.get(key):
            changes.append(f"input {key} changed ({_short(ia.get(key, 'none'))} -> {_short(ib.get(key, 'none'))})")
    if not changes and old.get("fingerprint") != new.fingerprint:
        changes.append("fingerprint differs")
    if len(changes) > limit:
        changes = changes[:limit] + [f"and {len(changes) - limit} more"]
    return changes


# ------------------------------------------------------------------------------------------------ manifests
def write_manifest(directory: str | Path, identity: Identity, *, files: Iterable[str] | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``{directory}/artifact.json`` (atomically, last): the identity, its fingerprint and the size and
    sha256 of ``files`` (relative names; default every file in the folder). Returns the manifest."""
    directory = Path(directory)
    listing = file_listing(directory, sorted(files) if files is not None else _list_files(directory))
    manifest = {**identity.as_dict(), "fingerprint": identity.fingerprint, "files": listing, **(extra or {})}
    atomic_write_text(directory / ARTIFACT_FILE, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def begin(directory: str | Path, identity: Identity, *, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Record, before a long stage writes anything else, the identity of the output it is making: a manifest with
    ``"complete": false`` and no files. A resumed stage compares it (:func:`decide` answers ``"reuse"`` when the
    fingerprint matches; :func:`is_complete` says whether to continue or skip), so resuming with other settings is
    refused too. :func:`write_manifest` replaces it (with the files) when the stage finishes."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    return write_manifest(directory, identity, files=[], extra={**(extra or {}), "complete": False})


def is_complete(manifest: Mapping[str, Any] | None) -> bool:
    """Whether a manifest describes a finished output (not one recorded by :func:`begin` only)."""
    return manifest is not None and manifest.get("complete", True) is not False


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of ``directory``, or None when it has none; an unreadable one is a one-line error."""
    path = Path(directory) / ARTIFACT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"unreadable artifact manifest ({type(e).__name__})", path=path) from None
    if not isinstance(data, dict) or "fingerprint" not in data or "kind" not in data:
        raise DataError("not an artifact manifest (no 'kind' / 'fingerprint')", path=path)
    return data


def fingerprint_of(directory: str | Path, *, kind: str | None = None) -> str:
    """The fingerprint recorded for ``directory`` (what a consumer records among its inputs); one-line error when
    the folder has no manifest or holds another kind of artifact."""
    m = read_manifest(directory)
    if m is None:
        raise StaleArtifactError(f"{directory}: no {ARTIFACT_FILE} (not made by this version of conceptlm, or its "
                                 "stage did not finish); run that stage again")
    if kind is not None and m["kind"] != kind:
        raise StaleArtifactError(f"{directory}: holds a {m['kind']!r} artifact, expected {kind!r}")
    if not is_complete(m):
        raise StaleArtifactError(f"{directory}: its stage did not finish; run that stage again")
    return str(m["fingerprint"])


def _has_content(directory: Path) -> bool:
    return directory.is_dir() and any(not p.name.startswith((".tmp-", ".old-", ".lock")) for p in directory.iterdir())


def decide(directory: str | Path, identity: Identity, *, on_change: OnChange = "refuse", what: str | None = None,
           option: str = "on_change", verify: bool = True) -> Literal["reuse", "build", "rebuild"]:
    """Whether a stage may reuse ``directory``.

    Returns ``"reuse"`` when its manifest's fingerprint equals ``identity``'s (and, with ``verify``, every listed
    file has its recorded size and sha256), ``"build"`` when nothing was written there yet, ``"rebuild"`` when it
    differs (or has no manifest) and ``on_change == "rebuild"`` (the caller removes or overwrites it).

    Raises:
        StaleArtifactError: it differs and ``on_change == "refuse"``: one line naming ``what`` changed and the
            option that rebuilds (``option``).
    """
    directory = Path(directory)
    name = what or str(directory)
    old = read_manifest(directory)
    if old is None:
        if not _has_content(directory):
            return "build"
        changes = [f"no {ARTIFACT_FILE} (made by an older version, or its stage did not finish)"]
    elif old.get("fingerprint") == identity.fingerprint and old.get("kind") == identity.kind:
        if not verify:
            return "reuse"
        problem = damaged_file(directory, old)
        if problem is None:
            return "reuse"
        changes = [problem]
    else:
        changes = diff_identity(old, identity)
    if on_change == "rebuild":
        log.warning("%s: rebuilding (%s)", name, "; ".join(changes))
        return "rebuild"
    raise StaleArtifactError(f"{name}: {'; '.join(changes)}; rerun with {option}=rebuild")


def file_listing(root: str | Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "sha256"}}`` of the files ``names`` (relative to ``root``, in that order): what a manifest
    records and :func:`listed_file_problem` checks."""
    root = Path(root)
    return {rel: {"size": (root / rel).stat().st_size, "sha256": file_sha256(root / rel)} for rel in names}


def damaged_file(directory: str | Path, manifest: Mapping[str, Any] | None = None,
                 names: Iterable[str] | None = None) -> str | None:
    """None when every file listed in the manifest (or the subset ``names``) has its recorded size and sha256;
    else one line naming the first that does not."""
    directory = Path(directory)
    manifest = manifest if manifest is not None else read_manifest(directory)
    if manifest is None:
        return f"{directory}: no {ARTIFACT_FILE}"
    return listed_file_problem(directory, manifest.get("files") or {}, names)


def listed_file_problem(root: str | Path, listing: Mapping[str, Mapping[str, Any]],
                        names: Iterable[str] | None = None) -> str | None:
    """None when every file of ``listing`` (``{relative name: {"size", "sha256"}}``, or its subset ``names``) under
    ``root`` has its recorded size and sha256; else one line naming the first that does not (sizes first: cheap)."""
    root = Path(root)
    for rel in (names if names is not None else sorted(listing)):
        meta = listing.get(rel)
        p = root / rel
        if meta is None:
            return f"{p}: not listed in {ARTIFACT_FILE}"
        if not p.is_file():
            return f"{p}: missing"
        size = p.stat().st_size
        if size != meta["size"]:
            return f"{p}: {size} bytes, the manifest says {meta['size']} (truncated or replaced)"
        if file_sha256(p) != meta["sha256"]:
            return f"{p}: checksum mismatch (damaged or changed since it was written)"
    return None


def verify_files(directory: str | Path, manifest: Mapping[str, Any] | None = None,
                 names: Iterable[str] | None = None) -> None:
    """:func:`damaged_file`, raised as a one-line :class:`~conceptlm.core.errors.DataError`."""
    problem = damaged_file(directory, manifest, names)
    if problem is not None:
        raise DataError(problem)


def require(directory: str | Path, *, kind: str, verify: bool = True, what: str | None = None) -> dict[str, Any]:
    """A consumer's check of what it reads: ``directory`` holds a complete ``kind`` artifact whose files are
    intact. Returns its manifest (whose ``fingerprint`` the consumer records among its inputs)."""
    m = read_manifest(directory)
    name = what or str(directory)
    if m is None:
        raise StaleArtifactError(f"{name}: no {ARTIFACT_FILE} (not made by this version of conceptlm, or its stage "
                                 "did not finish); run that stage again")
    if m["kind"] != kind:
        raise StaleArtifactError(f"{name}: holds a {m['kind']!r} artifact, expected {kind!r}")
    if not is_complete(m):
        raise StaleArtifactError(f"{name}: its stage did not finish; run that stage again")
    if verify:
        verify_files(directory, m)
    return m
