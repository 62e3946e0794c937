"""Built-in generators for the offline default datasets (no download needed)."""

from conceptlm.data.generators.nlrx import (
    SYSTEM_PROMPT,
    generate_pairs,
    generate_records,
    make_splits,
    write_jsonl,
)

__all__ = ["SYSTEM_PROMPT", "generate_pairs", "generate_records", "make_splits", "write_jsonl"]
