"""Optional trackers (run.trackers): wandb in offline mode and trackio's local store receive exactly the rows of
metrics.jsonl; read back from their own files, no network."""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conceptlm.core.config import load_config
from conceptlm.core.errors import ConfigError
from conceptlm.core.trackers import open_trackers, tracker_values
from tests.core.toy_recipe import ToyConfig

ROOT = Path(__file__).resolve().parents[2]


def test_tracker_values_keeps_finite_numbers_under_split_names():
    row = {"loss": 2.5, "lm": 1, "flag": True, "name": "x", "bad": float("nan"), "inf": float("inf")}
    assert tracker_values("eval", row) == {"eval/loss": 2.5, "eval/lm": 1.0}


def test_unknown_or_repeated_tracker_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="run.trackers.*unknown tracker 'mlflow'"):
        load_config(ToyConfig, None, ["run.trackers=[mlflow]"])
    with pytest.raises(ConfigError, match="run.trackers.*twice"):
        load_config(ToyConfig, None, ["run.trackers=[wandb,wandb]"])


def test_missing_package_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trackio", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="trackio is not installed; pip install trackio"):
        open_trackers(["trackio"], tmp_path, project="p", run_name="r", config={}, resume=False)


def _wandb_history(run_dir) -> list[dict[str, float]]:
    """The history rows of the (single) offline wandb run under ``run_dir/wandb``: the .wandb file is a LevelDB-style
    log (7-byte file header, 32 KiB blocks, records of crc32 + length + type) of protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, block, records, part = path.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            part = (part if kind == 3 else b"") + chunk
        elif kind == 4:
            records.append(part + chunk)
    rows = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            rows.append({k: v for k, v in items.items() if not k.startswith("_")} | {"step": items["_step"]})
    return rows


def _trackio_rows(store) -> list[dict[str, float]]:
    (db,) = store.glob("*.db")
    with sqlite3.connect(db) as con:
        return [json.loads(m) | {"step": s} for s, m in con.execute("select step, metrics from metrics order by id")]


def _expected(run_dir) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [tracker_values(r["split"], {k: v for k, v in r.items() if k not in ("step", "split", "time")})
            | {"step": r["step"]} for r in rows]


def _by_step(rows: list[dict]) -> list[dict]:
    out: dict[int, dict] = {}
    for r in rows:
        out.setdefault(r["step"], {}).update(r)
    return list(out.values())


def _train(tmp_path, *overrides: str):
    """The toy recipe in a fresh process (trackio reads TRACKIO_DIR when first imported)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp_path / "trackio"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = [f"run.out_dir={tmp_path}", "run.name=t", "run.trackers=[wandb,trackio]", "run.tracker_project=proj",
            "train.eval_every=2", "train.save_every=2", "train.log_every=1", "train.micro_batch_size=8",
            "toy.n_examples=32", *overrides]
    subprocess.run([sys.executable, "-m", "tests.core.toy_recipe", *args], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    return tmp_path / "t"


@pytest.mark.slow
def test_trackers_receive_every_metrics_row_and_resume_the_same_run(tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("trackio")
    run_dir = _train(tmp_path, "train.max_steps=4")
    expected = _expected(run_dir)
    assert len(expected) == 6  # 4 train rows + 2 eval rows
    assert _wandb_history(run_dir) == _by_step(expected)  # wandb joins what is logged at one step into one row
    assert _trackio_rows(tmp_path / "trackio") == expected
    ids = json.loads((run_dir / "trackers.json").read_text())

    # resumed with more steps: the same tracker runs continue (ids kept), new rows appended
    _train(tmp_path, "train.max_steps=6", "run.resume=auto")
    assert json.loads((run_dir / "trackers.json").read_text()) == ids
    folders = list(run_dir.glob("wandb/offline-run-*"))
    assert len(folders) == 2 and all(p.name.endswith(ids["wandb"]) for p in folders)  # one per process, same id
    assert _trackio_rows(tmp_path / "trackio") == _expected(run_dir)  # 4 + 2 steps, nothing twice
    with sqlite3.connect(next((tmp_path / "trackio").glob("*.db"))) as con:
        assert {r[0] for r in con.execute("select run_name from metrics")} == {f"t-{ids['trackio']}"}
