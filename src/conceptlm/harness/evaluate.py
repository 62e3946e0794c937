"""Run lm-evaluation-harness on a model and keep its numbers.

::

    from conceptlm.harness.evaluate import evaluate, hf_model_args, summarize
    res = evaluate("hf", tasks=["my_mc"], include_path="tasks/",
                   model_args=hf_model_args("runs/sft/checkpoints/step_00000100/model"))
    summarize(res)    # {"my_mc": {"acc": 0.75, "acc_norm": 0.5}}

The command-line equivalent is ``lm_eval --model hf --model_args pretrained=FOLDER --tasks my_mc --include_path
tasks/`` (``python -m conceptlm.harness`` for conceptlm's own models). Offline use needs ``HF_DATASETS_OFFLINE=1``
and ``HF_HUB_OFFLINE=1`` and tasks over local files (:mod:`conceptlm.harness.tasks`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conceptlm.core.errors import ConfigError
from conceptlm.core.io import atomic_write_text

__all__ = ["evaluate", "summarize", "write_results", "hf_model_args", "merge_lora", "task_manager"]


def _lm_eval():
    try:
        import lm_eval
        import lm_eval.models  # noqa: F401  (registers the harness's models even when ours registered first)
    except ImportError:
        raise ConfigError("lm-evaluation-harness is not installed: pip install 'conceptlm[harness]'",
                          field="harness") from None
    return lm_eval


def task_manager(tasks: list[str], include_path: str | Path | list[str | Path] | None = None):
    """A ``TaskManager`` that knows ``tasks``: only the tasks under ``include_path`` when they are all there (fast,
    nothing from the harness's own catalogue), else those and the harness's built-in tasks."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    paths = None if include_path is None else [str(p) for p in (include_path if isinstance(include_path, list)
                                                                  else [include_path])]
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s) {unknown}" + (f" (looked in {paths} and the harness's own tasks)"
                                                                  if paths else "; pass include_path"),
                          field="harness.tasks")
    return manager


def evaluate(model: Any, *, tasks: list[str], model_args: str | dict | None = None,
             include_path: str | Path | list[str | Path] | None = None, limit: int | float | None = None,
             num_fewshot: int | None = None, batch_size: int | str = 1, device: str | None = None,
             log_samples: bool = False, seed: int = 0) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on ``model`` (a registered name such as ``"hf"`` with ``model_args``, or an
    ``lm_eval.api.model.LM`` instance); returns the harness's result dict (``results``, ``configs``, ``n-samples``,
    and ``samples`` with ``log_samples``). All four of the harness's seeds are ``seed``."""
    lm_eval = _lm_eval()
    if not tasks:
        raise ConfigError("give at least one task", field="harness.tasks")
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=list(tasks), task_manager=task_manager(list(tasks), include_path),
        limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, device=device, log_samples=log_samples,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)


def summarize(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """task -> metric -> value from a harness result (``acc,none`` -> ``acc``; other filters keep their
    ``metric,filter`` key; standard errors and non-numbers left out)."""
    out: dict[str, dict[str, float]] = {}
    for task, row in (results.get("results") or {}).items():
        metrics: dict[str, float] = {}
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            metrics[metric if filt == "none" else key] = float(value)
        out[task] = metrics
    return out


def write_results(path: str | Path, results: dict[str, Any], *, extra: dict[str, Any] | None = None) -> Path:
    """Write the harness's ``results`` (samples left out), their :func:`summarize` and ``extra`` as one JSON file,
    atomically; returns ``path``."""
    from lm_eval.utils import handle_non_serializable

    body = {**(extra or {}), "summary": summarize(results),
            "harness": {k: v for k, v in results.items() if k != "samples"}}
    path = Path(path)
    atomic_write_text(path, json.dumps(body, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return path


def hf_model_args(folder: str | Path, *, base: str | Path | None = None, dtype: str = "float32") -> str:
    """The ``hf`` model's ``model_args`` for a conceptlm export folder.

    * an HF model (SFT / JEPA ``model/``): ``pretrained=FOLDER``;
    * a LoRA adapter (``adapter_config.json``): ``pretrained=BASE,peft=FOLDER`` with ``BASE`` the adapter's
      ``base_model_name_or_path`` (or ``base``), and the tokenizer from ``FOLDER`` when it holds one;
    * a CoCoMix Hub-format folder: ``pretrained=FOLDER,trust_remote_code=True``.

    The device is the harness's own argument (``device=`` of :func:`evaluate`, ``--device``), not part of these.
    """
    folder = Path(folder)
    parts: list[str]
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        base = base or json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{adapter} names no base model; pass base=", path=adapter)
        parts = [f"pretrained={base}", f"peft={folder}"]
        if (folder / "tokenizer_config.json").is_file():
            parts.append(f"tokenizer={folder}")
    elif (folder / "config.json").is_file():
        parts = [f"pretrained={folder}"]
        if "auto_map" in json.loads((folder / "config.json").read_text(encoding="utf-8")):
            parts.append("trust_remote_code=True")
    else:
        raise ConfigError(f"{folder} holds no Hugging Face model (config.json) or adapter (adapter_config.json)",
                          path=folder)
    parts.append(f"dtype={dtype}")
    return ",".join(parts)


def merge_lora(adapter_folder: str | Path, output: str | Path, *, base: str | Path | None = None) -> Path:
    """Merge a LoRA export into its base model and save the result (with the adapter folder's tokenizer) as a plain
    HF folder at ``output``, which ``lm_eval --model hf`` reads like any model."""
    from peft import PeftModel

    from conceptlm.core.hf import load_causal_lm, load_tokenizer

    adapter_folder = Path(adapter_folder)
    if base is None:
        base = json.loads((adapter_folder / "adapter_config.json").read_text(encoding="utf-8"))[
            "base_model_name_or_path"]
    model = PeftModel.from_pretrained(load_causal_lm(base), str(adapter_folder)).merge_and_unload()
    output = Path(output)
    model.save_pretrained(output, safe_serialization=True)
    load_tokenizer(adapter_folder if (adapter_folder / "tokenizer_config.json").is_file() else base).save_pretrained(
        output)
    return output
