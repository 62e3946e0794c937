"""Shared test fixtures: offline env, a tiny chat JSONL, the shared data location; the test tiers (markers
``slow`` and ``shared_data``, see :func:`pytest_collection_modifyitems`)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CONCEPTLM_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data" / "llm_jepa"

def load_benchmark(name: str):
    """The module of the script ``benchmarks/<name>.py`` (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


WORDS = ("dog truck ring lake lines with words number letter vowel capital before after containing string "
         "zero or more times at least once ending starting").split()


def make_chat_records(n: int, seed: int = 0) -> list[dict]:
    """Synthetic chat records with varied lengths (deterministic)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
        answer = "".join(rng.choice("abcdxyz()[]*.|") for _ in range(rng.randint(2, 20)))
        out.append({"messages": [{"role": "system", "content": "Convert."},
                                 {"role": "user", "content": user},
                                 {"role": "assistant", "content": answer}]})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def chat_files(tmp_path) -> tuple[Path, Path]:
    """(train.jsonl with 256 records, eval.jsonl with 48 records)."""
    return (write_jsonl(tmp_path / "train.jsonl", make_chat_records(256, seed=1)),
            write_jsonl(tmp_path / "eval.jsonl", make_chat_records(48, seed=2)))


def tiny_overrides(tmp_path: Path, train: Path, evalf: Path | None = None, **extra) -> list[str]:
    """Overrides for a seconds-long SFT run in ``tmp_path``."""
    base = {
        "run.out_dir": str(tmp_path / "runs"), "run.name": "t", "data.train": str(train),
        "data.max_length": 128, "tokenizer.vocab_size": 320, "model.hidden_size": 32, "model.num_layers": 2,
        "model.num_heads": 2, "model.max_position_embeddings": 128, "optim.lr": 3e-3, "schedule.warmup_steps": 2,
        "train.max_steps": 4, "train.micro_batch_size": 8, "train.log_every": 1, "train.eval_every": 0,
        "train.progress": False,
    }
    if evalf is not None:
        base["data.eval"] = str(evalf)
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread is as fast, and far more robust when other processes share the cores.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------------ test tiers
# ``python -m pytest -q`` runs everything (CI). ``-m "not slow"`` is the fast tier (about 2-3 minutes on 2 cores);
# ``-m "not shared_data"`` leaves out the tests that read ../shared (they skip when it is absent anyway).
# The tiers are kept here, as lists, rather than as decorators in the test files: one place to re-balance after
# measuring (``--durations=80``), and the method test files stay free of tier bookkeeping. Every ``distributed``
# test (torchrun workers) is slow too. A listed test that no longer exists in its (collected) file is an error, so
# a rename cannot silently move a test between tiers.

SLOW = (
    # seconds measured on 2 shared cores (--durations), slowest first; tests sharing an expensive module fixture
    # are listed together so that the fixture's cost leaves the fast tier with them
    "tests/test_cli.py::test_demo_runs_end_to_end",  # 252
    "tests/jepa/test_hf_trainer_args.py::test_example_script_runs_offline",  # 33
    "tests/lcm/test_recipe.py::test_every_variant_trains_generates_and_evaluates",  # 27, fixture `trained`
    "tests/lcm/test_recipe.py::test_verbs_end_to_end",  # 18
    "tests/lcm/test_recipe.py::test_generate_from_a_prompt_text",
    "tests/lcm/test_recipe.py::test_generate_without_a_run_or_decoder_says_what_to_run",
    "tests/lcm/test_recipe.py::test_retrieval_bank_takes_the_prepared_vectors",
    "tests/lcm/test_recipe.py::test_instruction_data_trains_on_the_answer_and_is_scored_on_it",  # 17
    "tests/lcm/test_recipe.py::test_cost_verb_writes_the_table_and_plot",  # 4
    "tests/lcm/test_decoder_train.py::test_tiny_prefix_decoder_memorizes_its_training_sentences",  # 22, `memorized`
    "tests/lcm/test_decoder_train.py::test_eval_rows_carry_decoding_metrics_and_export_loads",
    "tests/jepa/test_packed_equivalence.py::test_packed_equals_separate",  # 21
    "tests/core/test_gguf.py::test_smollm2_perplexity_vs_random_init",  # 14
    "tests/cocomix/test_hardening.py::test_labels_sae_path_loads_a_foreign_sae_and_labels_like_its_conversion",  # 12
    "tests/sft/test_sft.py::test_tiny_model_on_synth_lowers_eval_loss",  # 11
    "tests/jepa/test_recipe.py::test_packed_equals_separate_after_training",  # 11
    "tests/eval/test_regex_equiv.py::test_random_extended_regexes_agree_with_brute_force",  # 8
    "tests/lcm/test_segment.py::test_sat_backend_when_available",  # 8
    "tests/cocomix/test_label_cache.py::test_label_verb_refuses_wrong_layer_missing_sae_and_changed_settings",  # 7
    "tests/lcm/test_train.py::test_training_beats_repeating_the_previous_sentence",  # 6
    "tests/jepa/test_stp.py::test_cli_stp_on_chat_and_plain_text",  # 6
    "tests/jepa/test_stp.py::test_jepa_trainer_stp",  # 6
    "tests/lcm/test_quant_lcm.py::test_short_training_lowers_the_loss",  # 6
    "tests/data/test_nlrx_generator.py::test_max_depth_and_errors",  # 6
    "tests/jepa/test_stp.py::test_lambda_zero_is_ntp_bit_for_bit",  # 6
    "tests/jepa/test_hf_trainer_args.py::test_training_and_evaluation_stop_on_a_contradiction",  # 5
    "tests/jepa/test_flex_attention.py::test_flex_packed_forward_equals_dense_packed_and_separate",  # 5
    "tests/core/test_trainer.py::test_training_lowers_eval_loss_and_writes_metrics",  # 5
    "tests/data/test_nlrx_generator.py::test_every_regex_parses_and_means_its_tree_with_regex_equiv",  # 5
    "tests/eval/test_regex_equiv.py::test_all_synth_test_targets_parse_and_are_self_equivalent",  # 5
    "tests/lcm/test_two_tower.py::test_a_short_run_lowers_the_loss",  # 5
    "tests/lcm/test_quant_lcm.py::test_cached_equals_uncached_and_batched_equals_single",  # 4
    "tests/jepa/test_sliding_window.py::test_packed_equals_separate_with_a_short_window",  # 4
    "tests/lcm/test_rvq.py::test_same_codes_as_vector_quantize_pytorch_and_a_fit_at_least_as_good",  # 4
    "tests/eval/test_regex_equiv.py::test_random_regexes_agree_with_python_re",  # 4
    "tests/cocomix/test_pipeline.py::test_pipeline_end_to_end_then_every_stage_is_skipped",  # 4
    "tests/jepa/test_recipe.py::test_lambda_zero_is_sft_bit_for_bit",  # 4
    "tests/core/test_trainer.py::test_grad_accumulation_equivalence",  # 4
    "tests/jepa/test_stp.py::test_span_draws_respect_constraints",  # 4
    "tests/jepa/test_hf_trainer.py::test_grad_accumulation_equivalence",  # 4
    "tests/jepa/test_recipe.py::test_jepa_term_changes_training",  # 3
    "tests/sft/test_sft.py::test_batched_greedy_generation_equals_one_by_one",  # 3
    "tests/jepa/test_recipe.py::test_train_eval_analyze_cli",  # 3
    "tests/data/test_fuzz_records.py::test_fuzzed_jsonl_gives_a_located_data_error_or_a_dataset",  # 3
    "tests/core/test_trainer.py::test_seeded_runs_are_reproducible",  # 3
    "tests/jepa/test_stp.py::test_grad_accumulation_equivalence",  # 3
    "tests/lcm/test_segment.py::test_spacy_backend_when_installed",  # 3
    # second measurement, of the fast tier itself (1181 tests, 197 s with the machine's load at 5-7 on 2 cores)
    "tests/lcm/test_encoders.py::test_minilm_equals_sentence_transformers",  # 7, fixture `minilm`
    "tests/lcm/test_encoders.py::test_order_restored_and_batch_size_invariant",  # 6
    "tests/lcm/test_encoders.py::test_minilm_identity",
    "tests/jepa/test_recipe.py::test_eval_and_analyze_a_model_without_predictor_tokens",  # 5
    "tests/core/test_trainer.py::test_lora_run_trains_only_adapters_and_round_trips",  # 5
    "tests/jepa/test_long_seq_bench.py::test_tiny_cpu_run_arms_agree_on_the_first_step",  # 4
)
"""Slow tests besides the ``distributed`` ones and those marked ``slow`` in their file."""

SHARED_DATA_TESTS = (
    "tests/cocomix/test_corpus.py::test_real_reviews_from_shared_jsonl",
    "tests/core/test_gguf.py::test_smollm2_perplexity_vs_random_init",
    "tests/data/test_chat.py::test_shared_synth_first_200",
    "tests/data/test_nlrx_generator.py::test_hand_checked_cases_are_real_synth_train_lines",
    "tests/data/test_nlrx_generator.py::test_operator_profile_close_to_synth_train",
    "tests/eval/test_regex_equiv.py::test_all_synth_test_targets_parse_and_are_self_equivalent",
    "tests/jepa/test_code_view.py::test_smollm2_code_view_on_synth",
    "tests/lcm/test_documents.py::test_yelp_reviews_read",
    "tests/lcm/test_encoders.py::test_minilm_equals_sentence_transformers",  # Yelp sentences when present
    "tests/lcm/test_prepare.py::test_yelp_reviews_prepare",
    "tests/lcm/test_segment.py::test_round_trip_on_yelp_reviews",
    "tests/sft/test_sft.py::test_tiny_model_on_synth_lowers_eval_loss",
)
"""Tests that read ``../shared`` (data or models); each skips when it is absent."""


def _test_id(item) -> str:
    """``tests/<path>.py::<test>`` of a collected item, without its parameters (and its class, if any)."""
    path = Path(str(item.path)).resolve().relative_to(REPO).as_posix()
    return f"{path}::{getattr(item, 'originalname', item.name)}"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    tiers = {"slow": set(SLOW), "shared_data": set(SHARED_DATA_TESTS)}
    modules = {}
    for item in items:
        test_id = _test_id(item)
        if getattr(item, "module", None) is not None:
            modules[test_id.split("::")[0]] = item.module
        if item.get_closest_marker("distributed") is not None:
            item.add_marker(pytest.mark.slow)
        for marker, ids in tiers.items():
            if test_id in ids:
                item.add_marker(getattr(pytest.mark, marker))
    stale = sorted(t for ids in tiers.values() for t in ids
                   if t.split("::")[0] in modules and not hasattr(modules[t.split("::")[0]], t.split("::")[1]))
    if stale:
        raise pytest.UsageError(f"tests/conftest.py lists tests that do not exist (renamed or removed?): {stale}")
