"""Metrics loggers (runtime.loggers): csv, tensorboard and wandb hold exactly what metrics.jsonl
holds, per step and per epoch, from rank 0 only, without duplicates after a resume.

The runs are tiny (synthetic 32 training images, batch 8: 4 steps per epoch, a step record every
2 steps). TensorBoard events are read back with tensorboard's own EventAccumulator; the W&B
offline run is read back from its ``.wandb`` file (a LevelDB-style log of protobuf records) by a
reader written here.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kdlab.api import load_experiment, train
from kdlab.config import validate_config
from kdlab.core.distributed import DistInfo
from kdlab.core.errors import ConfigError
from kdlab.engine.loggers import (
    LOGGERS,
    CsvLogger,
    CsvTable,
    LoggerStart,
    MetricsLogger,
    RunLoggers,
    flatten,
    register_logger,
)

STEPS_PER_EPOCH = 4
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None
needs_tensorboard = pytest.mark.skipif(not HAS_TENSORBOARD,
                                       reason="tensorboard is not installed (kdlab[tensorboard])")
needs_wandb = pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (kdlab[wandb])")


def config(loggers: list[str], epochs: int = 2, **runtime: Any) -> dict[str, Any]:
    return {
        "name": "loggers",
        "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 16,
                 "synthetic": {"n_train": 32, "n_test": 16, "num_classes": 10}},
        "student": {"arch": "resnet8"},
        "optim": {"epochs": epochs, "milestones": [1], "lr": 0.05},
        "runtime": {"threads": 2, "amp": "off", "log_every": 2, "loggers": loggers, **runtime},
    }


def wandb_env(folder: Path, mp: pytest.MonkeyPatch) -> None:
    """wandb's own settings and caches stay inside ``folder``."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        mp.setenv(var, str(folder / "wandb-home"))
    mp.delenv("WANDB_MODE", raising=False)
    mp.delenv("WANDB_RUN_ID", raising=False)


@pytest.fixture(autouse=True)
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb_env(tmp_path, monkeypatch)


def run(run_dir: Path, cfg: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return train(load_experiment(cfg), run_dir, **kwargs)


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def same_value(cell: str, value: Any) -> bool:
    """A CSV cell holds exactly ``value`` (floats bit for bit)."""
    if value is None:
        return cell == ""
    if isinstance(value, bool):
        return cell == ("true" if value else "false")
    if isinstance(value, float):
        return float(cell) == value or (math.isnan(value) and math.isnan(float(cell)))
    return cell == str(value)




def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under ``log_dir`` as TensorBoard shows it (purged events hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_history(run_dir: Path) -> list[tuple[str, int, dict[str, Any]]]:
    """(run id, step, values) of every history row in the offline runs of ``run_dir``.

    The ``.wandb`` file: a 7-byte header (":W&B", magic, version), then records in 32 KiB
    blocks, each chunk with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle,
    4 last), a block's tail shorter than a header being padding; a record is a protobuf
    ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        pos, pending = 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0 and length == 0:  # zero padding up to the block's end
                pos += left
                continue
            pending += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    values = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                              for item in record.history.item}
                    rows.append((path.stem[len("run-"):], record.history.step.num, values))
    return rows


# --------------------------------------------------------------------------- config
def test_unknown_and_repeated_logger_names_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown logger 'tensorbord'; did you mean "
                                          "tensorboard") as e:
        validate_config(config(["jsonl", "tensorbord"]))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="logger 'csv' is listed twice"):
        validate_config(config(["csv", "csv"]))
    assert validate_config(config(["csv"])).runtime.wandb.mode == "offline"


def test_logger_keys_do_not_change_the_fingerprint() -> None:
    """Loggers do not change a number: a run resumes with other loggers, and a config of kdlab
    0.1 (no loggers key) keeps its fingerprint."""
    base = validate_config(config(["jsonl"]))
    other = validate_config(config(["csv", "wandb"], wandb={"project": "p", "mode": "online"}))
    assert base.fingerprint() == other.fingerprint()
    old = config(["jsonl"])
    del old["runtime"]["loggers"]
    assert validate_config(old).fingerprint() == base.fingerprint()


def test_missing_package_is_one_config_line_before_anything_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        run(tmp_path / "run", config(["jsonl", "tensorboard"]))
    assert str(e.value) == ("config key 'runtime.loggers': logger 'tensorboard' needs the "
                            "tensorboard package: pip install -e '.[tensorboard]' in the kdlab "
                            "clone")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- one run, every logger
#: the loggers that can run here (csv always; tensorboard and wandb when installed)
AVAILABLE = ["csv"] + ["tensorboard"] * HAS_TENSORBOARD + ["wandb"] * HAS_WANDB
#: what the "recorder" logger of the shared run received: (kind, step, record)
RECORDED: list[tuple[str, int, dict[str, Any]]] = []


class Recorder(MetricsLogger):
    """A user's logger, registered like a plugin's: it keeps every call."""

    name = "recorder"

    def log_step(self, step: int, record: dict[str, Any]) -> None:
        RECORDED.append(("step", step, record))

    def log_epoch(self, step: int, record: dict[str, Any]) -> None:
        RECORDED.append(("epoch", step, record))

    def close(self, summary: dict[str, Any] | None = None, failed: bool = False) -> None:
        RECORDED.append(("close", 0, dict(summary or {}, failed=failed)))


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A 2-epoch run with every available logger and the recorder, jsonl not listed (metrics.jsonl
    is written all the same): (run dir, summary)."""
    folder = tmp_path_factory.mktemp("logged")
    register_logger(Recorder)
    RECORDED.clear()
    try:
        with pytest.MonkeyPatch.context() as mp:
            wandb_env(folder, mp)
            rd = folder / "run"
            summary = run(rd, config([*AVAILABLE, "recorder"], epochs=2,  # no jsonl listed
                                     wandb={"project": "kdlab-test"}))
    finally:
        LOGGERS.unregister("recorder")
    return rd, summary


@pytest.mark.e2e
def test_csv_rows_equal_metrics_jsonl_and_the_step_records(logged: tuple[Path, Any]) -> None:
    rd, _ = logged
    records = metrics(rd)
    epochs = read_csv(rd / "epochs.csv")
    assert len(epochs) == len(records) == 2
    for row, record in zip(epochs, records, strict=True):
        flat = flatten(record)
        assert set(row) == set(flat)
        assert all(same_value(row[k], v) for k, v in flat.items()), (row, flat)
    steps = read_csv(rd / "steps.csv")
    assert [int(r["step"]) for r in steps] == [2, 4, 6, 8]
    assert [int(r["epoch"]) for r in steps] == [1, 1, 2, 2]
    with open(rd / "steps.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:2] == ["epoch", "step"] and header[2:] == sorted(header[2:])
    for record in records:  # the last step of an epoch: the epoch's own running means
        last = next(r for r in steps if int(r["step"]) == record["epoch"] * STEPS_PER_EPOCH)
        for key in ("train_loss", "train_terms/ce", "train_top1"):
            assert float(last[key]) == flatten(record)[key], key
        assert float(last["lr"]) == record["lr"]
    assert float(steps[0]["lr"]) == 0.05 and float(steps[-1]["lr"]) == pytest.approx(0.005)


@pytest.mark.e2e
def test_a_registered_logger_gets_every_record(logged: tuple[Path, Any]) -> None:
    rd, summary = logged
    assert [(k, s) for k, s, _ in RECORDED] == [
        ("step", 2), ("step", 4), ("epoch", 4), ("step", 6), ("step", 8), ("epoch", 8),
        ("close", 0)]
    assert [r for k, _, r in RECORDED if k == "epoch"] == metrics(rd)
    assert RECORDED[-1][2] == dict(summary, failed=False)
    assert set(RECORDED[0][2]) == {"epoch", "step", "lr", "train_loss", "train_terms",
                                   "train_top1", "train_img_per_s"}


@pytest.mark.e2e
@needs_tensorboard
def test_tensorboard_scalars_are_the_records(logged: tuple[Path, Any]) -> None:
    rd, _ = logged
    series = scalars(rd / "tensorboard")
    records = metrics(rd)
    for key in ("test_top1", "test_top5", "test_loss", "train_loss", "train_terms/ce", "lr",
                "best_top1", "epoch"):
        expected = [(r["epoch"] * STEPS_PER_EPOCH, np.float32(flatten(r)[key]))
                    for r in records]
        assert series[f"epoch/{key}"] == expected, key
    steps = read_csv(rd / "steps.csv")
    for key in ("train_loss", "train_top1", "lr", "train_terms/ce"):
        assert series[f"step/{key}"] == [(int(r["step"]), np.float32(float(r[key])))
                                         for r in steps], key
    assert "step/step" not in series and "step/epoch" not in series


@pytest.mark.e2e
@needs_wandb
def test_wandb_offline_run_holds_the_history(logged: tuple[Path, Any]) -> None:
    rd, summary = logged
    runs = list((rd / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    rows = wandb_history(rd)
    records = metrics(rd)
    epoch_rows = [(step, v) for _, step, v in rows if "epoch/epoch" in v]
    assert [s for s, _ in epoch_rows] == [4, 8]
    for (_, values), record in zip(epoch_rows, records, strict=True):
        for key in ("test_top1", "test_top5", "train_loss", "best_top1", "lr"):
            assert values[f"epoch/{key}"] == pytest.approx(record[key], rel=1e-12), key
    step_rows = [(step, v) for _, step, v in rows if "step/train_loss" in v]
    assert [s for s, _ in step_rows] == [2, 4, 6, 8]
    state = json.loads((rd / "wandb" / "kdlab-wandb.json").read_text())
    assert runs[0].name.endswith(state["id"]) and state["step"] == 8 and state["epoch"] == 2
    assert summary["best_top1"] == max(r["test_top1"] for r in records)


# --------------------------------------------------------------------------- csv alone
def test_csv_header_widens_when_a_key_appears_later(tmp_path: Path) -> None:
    """A record with a new key (test_* first appears at the first evaluated epoch) rewrites
    the file with the wider, still sorted header; earlier rows get empty cells."""
    table = CsvTable(tmp_path / "epochs.csv", ("epoch",))
    table.append({"epoch": 1, "train_loss": 2.5, "train_terms": {"ce": 2.5}})
    table.append({"epoch": 2, "train_loss": 0.1 + 0.2, "train_terms": {"ce": 0.3},
                  "test_top1": 12.5, "note": None})
    table.append({"epoch": 3, "train_loss": 1e-300, "train_terms": {"ce": 1e-300}})
    with open(tmp_path / "epochs.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == ["epoch", "note", "test_top1", "train_loss", "train_terms/ce"]
    rows = read_csv(tmp_path / "epochs.csv")
    assert [r["test_top1"] for r in rows] == ["", "12.5", ""]
    assert float(rows[1]["train_loss"]) == 0.1 + 0.2 and float(rows[2]["train_loss"]) == 1e-300
    assert CsvTable(tmp_path / "epochs.csv", ("epoch",)).header == header


def test_a_new_start_drops_the_rows_of_a_failed_start(tmp_path: Path) -> None:
    """A run started afresh (it never completed an epoch) keeps no row; a resumed one keeps
    the rows up to its checkpoint and rewrites epochs.csv from metrics.jsonl."""
    cfg = load_experiment(config(["csv"]))
    table = CsvTable(tmp_path / "steps.csv", ("epoch", "step"))
    for step in (2, 4, 6):
        table.append({"epoch": 1 + (step > 4), "step": step, "train_loss": 1.0})
    (tmp_path / "epochs.csv").write_text("epoch,train_loss\n1,1.0\n2,9.0\n")
    CsvLogger(LoggerStart(tmp_path, cfg, STEPS_PER_EPOCH, epoch=1, step=4,
                          history=[{"epoch": 1, "train_loss": 0.5}], resumed=True))
    assert [r["step"] for r in read_csv(tmp_path / "steps.csv")] == ["2", "4"]
    assert read_csv(tmp_path / "epochs.csv") == [{"epoch": "1", "train_loss": "0.5"}]
    CsvLogger(LoggerStart(tmp_path, cfg, STEPS_PER_EPOCH))
    assert not (tmp_path / "steps.csv").exists() and not (tmp_path / "epochs.csv").exists()


def test_a_failing_logger_is_dropped_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    class Broken(MetricsLogger):
        name = "broken"

        def log_epoch(self, step: int, record: dict[str, Any]) -> None:
            calls.append(step)
            raise OSError("disk full")

    loggers = RunLoggers([Broken(LoggerStart(Path("."), None, 4))])  # type: ignore[arg-type]
    loggers.log_epoch(4, {"epoch": 1})
    loggers.log_epoch(8, {"epoch": 2})
    loggers.close()
    assert calls == [4] and not loggers
    assert caplog.text.count("logger 'broken' failed (OSError: disk full)") == 1


# --------------------------------------------------------------------------- resume
@pytest.mark.e2e
def test_resume_from_an_earlier_checkpoint_duplicates_nothing(tmp_path: Path) -> None:
    """A run killed after epoch 2 whose last.pt is lost resumes from last.pt.prev (epoch 1):
    what the loggers held beyond epoch 1 is dropped (csv, tensorboard) or not sent again
    (wandb), and the finished run's loggers hold every step and epoch exactly once."""
    rd = tmp_path / "run"
    cfg = config(["jsonl", *AVAILABLE], epochs=3)
    run(rd, cfg, stop_after=2)
    first_second = int(time.time())
    assert len(read_csv(rd / "epochs.csv")) == 2 and len(read_csv(rd / "steps.csv")) == 4
    (rd / "checkpoints" / "last.pt").unlink()  # resume falls back to last.pt.prev: epoch 1
    while int(time.time()) <= first_second:  # event files are ordered by their second
        time.sleep(0.05)
    run(rd, cfg, resume="required")
    records = metrics(rd)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    epochs = read_csv(rd / "epochs.csv")
    assert [int(r["epoch"]) for r in epochs] == [1, 2, 3]
    for row, record in zip(epochs, records, strict=True):
        assert all(same_value(row[k], v) for k, v in flatten(record).items())
    assert [int(r["step"]) for r in read_csv(rd / "steps.csv")] == [2, 4, 6, 8, 10, 12]
    if HAS_TENSORBOARD:
        series = scalars(rd / "tensorboard")
        assert [s for s, _ in series["step/train_loss"]] == [2, 4, 6, 8, 10, 12]
        assert series["epoch/test_top1"] == [(4 * r["epoch"], np.float32(r["test_top1"]))
                                             for r in records]
    if HAS_WANDB:
        rows = wandb_history(rd)
        assert len({run_id for run_id, _, _ in rows}) == 1  # the same W&B run continued
        assert len(list((rd / "wandb").glob("offline-run-*"))) == 2
        assert [s for _, s, v in rows if "step/train_loss" in v] == [2, 4, 6, 8, 10, 12]
        assert [v["epoch/epoch"] for _, _, v in rows if "epoch/epoch" in v] == [1, 2, 3]


# --------------------------------------------------------------------------- rank 0 only
@pytest.mark.e2e
def test_ranks_other_than_0_log_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trainer that is not the main process (is_main False: what ranks 1.. see) opens no
    logger and writes no logger file."""
    monkeypatch.setattr(DistInfo, "is_main", property(lambda self: False))
    calls: list[str] = []

    @register_logger
    class Spy(MetricsLogger):
        name = "spy_rank"

        def __init__(self, start: Any) -> None:
            super().__init__(start)
            calls.append("open")

    try:
        rd = tmp_path / "run"
        run(rd, config([*AVAILABLE, "spy_rank"], epochs=1))
    finally:
        LOGGERS.unregister("spy_rank")
    assert calls == []
    assert {p.name for p in rd.iterdir()}.isdisjoint(
        {"steps.csv", "epochs.csv", "tensorboard", "wandb"})
