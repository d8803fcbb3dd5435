"""Metrics loggers (``runtime.loggers``): where a run's numbers go besides ``metrics.jsonl``.

``metrics.jsonl`` (the ``jsonl`` logger) is always written, listed or not: the trainer appends
one line per epoch itself, and resume, sweeps and reports read it; it is the source of truth.
The other loggers are views of the same numbers for other tools:

* ``csv``: ``RUN_DIR/steps.csv`` and ``RUN_DIR/epochs.csv``, one row per logged step / epoch;
* ``tensorboard``: ``RUN_DIR/tensorboard`` through ``torch.utils.tensorboard.SummaryWriter``
  (needs ``pip install -e '.[tensorboard]'``);
* ``wandb``: Weights & Biases (``runtime.wandb``; offline by default, under ``RUN_DIR/wandb``;
  needs ``pip install -e '.[wandb]'``).

What they receive, from rank 0 only:

* a **step record** every ``runtime.log_every`` steps and at the last step of an epoch, at the
  host synchronisation points the trainer already has (no new ones): ``epoch``, ``step`` (the
  training steps done in the run, skipped ones included: ``(epoch - 1) * steps_per_epoch + i``),
  ``lr``, and the epoch's running means so far: ``train_loss``, ``train_terms/<term>``, the
  task's training metric (``train_top1``) and ``train_img_per_s``. At the last step of an epoch
  these equal the epoch record's (single process);
* an **epoch record**: exactly the ``metrics.jsonl`` line (``test_<metric>`` for every metric of
  the task, so another task's names flow through unchanged), at step
  ``epoch * steps_per_epoch``; nested keys are flattened with ``/`` (``train_terms/kd``).

Resume never duplicates: a logger starts from where the checkpoint that the run continues from
left off (:class:`LoggerStart`). ``csv`` drops rows beyond it and rewrites ``epochs.csv`` from
``metrics.jsonl``; ``tensorboard`` writes a purge marker (``purge_step``) that hides the events
beyond it; ``wandb`` continues the same W&B run (its id is kept in
``RUN_DIR/wandb/kdlab-wandb.json``) and does not send again a step or an epoch it already sent.
The trainer logs an epoch before it writes the epoch's checkpoint, so whatever a killed run
logged beyond its last checkpoint is dropped on resume and never missing.

A new logger is one registered class::

    from kdlab.engine.loggers import MetricsLogger, register_logger

    @register_logger
    class Printer(MetricsLogger):
        name = "printer"

        def log_epoch(self, step, record):
            logging.getLogger("mine").info("epoch %d: %s", record["epoch"], record)

A logger that fails while logging is reported once and dropped for the rest of the run (the
run goes on; ``metrics.jsonl`` keeps every number); a logger that cannot start stops the run at
setup, before training.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import math
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kdlab.core.errors import ConfigError
from kdlab.core.io import atomic_write
from kdlab.core.registries import LOGGERS

if TYPE_CHECKING:
    from kdlab.config import ExperimentConfig
    from kdlab.engine.meters import EpochMeter

log = logging.getLogger(__name__)

__all__ = ["CsvLogger", "JsonlLogger", "LoggerStart", "MetricsLogger", "RunLoggers",
           "TensorBoardLogger", "WandbLogger", "flatten", "get_logger",
           "list_loggers", "open_loggers", "register_logger", "require_logger_packages",
           "step_record"]


@dataclass(frozen=True)
class LoggerStart:
    """Where a run's loggers start: a new run (``step`` 0), or the position of the checkpoint a
    resumed run continues from.

    Attributes:
        run_dir: the run directory.
        cfg: the run's config.
        steps_per_epoch: training steps per epoch.
        epoch: epochs complete in that checkpoint.
        step: training steps done in that checkpoint (``epoch * steps_per_epoch``, or mid-epoch
            for a step checkpoint).
        history: the ``metrics.jsonl`` records of epochs ``<= epoch``.
        resumed: whether the run continues (False: a new run, or one started afresh).
    """

    run_dir: Path
    cfg: ExperimentConfig
    steps_per_epoch: int
    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed: bool = False


class MetricsLogger:
    """Base of a registered logger: subclasses set ``name`` (and ``requires`` when they need a
    package) and override what they use. All methods are called on rank 0 only."""

    name: ClassVar[str]
    #: ``(import name, pip extra)`` of the package the logger needs; checked at setup.
    requires: ClassVar[tuple[str, str] | None] = None

    def __init__(self, start: LoggerStart) -> None:
        self.start = start

    def log_step(self, step: int, record: dict[str, Any]) -> None:
        """A step record (see the module's docstring) at run step ``step``."""

    def log_epoch(self, step: int, record: dict[str, Any]) -> None:
        """An epoch record (the ``metrics.jsonl`` line) at run step ``step``."""

    def close(self, summary: dict[str, Any] | None = None, failed: bool = False) -> None:
        """End of the run (``summary``: the run's summary when it ended normally)."""




def register_logger(cls: type[MetricsLogger]) -> type[MetricsLogger]:
    """Class decorator registering a :class:`MetricsLogger` under ``cls.name``."""
    return LOGGERS.register(cls.name, cls)


def get_logger(name: str) -> type[MetricsLogger]:
    """The logger class registered as ``name``."""
    return LOGGERS.get(name)


def list_loggers() -> list[str]:
    """Registered logger names."""
    return LOGGERS.names()


def require_logger_packages(names: list[str]) -> None:
    """Raise :class:`ConfigError` (one line, naming the pip extra) when a configured logger's
    package is not installed. Imports nothing."""
    for name in names:
        need = get_logger(name).requires
        if need is not None and importlib.util.find_spec(need[0]) is None:
            raise ConfigError(f"config key 'runtime.loggers': logger {name!r} needs the "
                              f"{need[0]} package: pip install -e '.[{need[1]}]' in the kdlab "
                              "clone")


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened into ``parent/child`` keys (``train_terms/kd``), order kept."""
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    """The flattened record's numbers (booleans, strings and None left out)."""
    return {k: float(v) for k, v in flatten(record).items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def step_record(meter: EpochMeter, epoch: int, step: int, lr: float) -> dict[str, Any]:
    """The step record of ``meter``'s epoch so far: running means of the loss terms (and their
    sum, ``train_loss``, computed as :meth:`EpochMeter.finish` does), the task's training metric
    and images per second. Reads the device (call it at a host synchronisation point)."""
    done = max(meter.steps, 1)
    values = [] if meter.term_sums is None else meter.term_sums.tolist()
    return {"epoch": epoch, "step": step, "lr": lr,
            "train_loss": sum(values) / done,
            "train_terms": {n: v / done for n, v in zip(meter.names, values, strict=True)},
            **meter.task_meter.summary(),
            "train_img_per_s": meter.task_meter.samples / max(meter.elapsed(), 1e-9)}


class RunLoggers:
    """The run's loggers, called by the trainer (an empty set on ranks other than 0)."""

    def __init__(self, loggers: list[MetricsLogger]) -> None:
        self.loggers = list(loggers)
        self._closed = False

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def _call(self, method: str, *args: Any) -> None:
        for logger in list(self.loggers):
            try:
                getattr(logger, method)(*args)
            except Exception as e:  # a logger must not end a long run: metrics.jsonl has it
                log.warning("logger %r failed (%s: %s); it logs nothing more in this run",
                            logger.name, type(e).__name__, e)
                self.loggers.remove(logger)

    def log_step(self, epoch: int, step: int, meter: EpochMeter, lr: float) -> None:
        """Log the step record of ``meter`` at run step ``step`` (nothing without loggers)."""
        if self.loggers:
            self._call("log_step", step, step_record(meter, epoch, step, lr))

    def log_epoch(self, step: int, record: dict[str, Any]) -> None:
        """Log an epoch's ``metrics.jsonl`` record at run step ``step``."""
        self._call("log_epoch", step, record)

    def close(self, summary: dict[str, Any] | None = None, failed: bool = False) -> None:
        """Close every logger once (later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        self._call("close", summary, failed)


def open_loggers(names: list[str], start: LoggerStart) -> RunLoggers:
    """The loggers ``names`` (``jsonl`` is the trainer's own metrics.jsonl: no object), started
    at ``start``. If one cannot start, those already started are closed and the error raised."""
    require_logger_packages(names)
    opened: list[MetricsLogger] = []
    try:
        for name in names:
            if name != JsonlLogger.name:
                opened.append(get_logger(name)(start))
    except BaseException:
        RunLoggers(opened).close(failed=True)
        raise
    return RunLoggers(opened)


# --------------------------------------------------------------------------- built in
@register_logger
class JsonlLogger(MetricsLogger):
    """``metrics.jsonl``: one JSON line per epoch, written (and fsynced) by the trainer itself
    whether or not ``jsonl`` is listed; resume, sweeps and reports read it."""

    name = "jsonl"


def _cell(value: Any) -> str:
    """A CSV cell: floats as ``repr`` (they read back to the same float), None empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int | str):
        return str(value)
    return json.dumps(value)


class CsvTable:
    """A CSV file with a stable header: the key columns, then every other key sorted. A record
    with a key the header lacks rewrites the file (atomically) with the wider header; earlier
    rows get empty cells there."""

    def __init__(self, path: Path, keys: tuple[str, ...]) -> None:
        self.path = path
        self.keys = keys
        self.header = self._read_header()

    def _read_header(self) -> list[str]:
        try:
            with open(self.path, newline="") as f:
                return next(csv.reader(f), [])
        except FileNotFoundError:
            return []

    def rows(self) -> list[dict[str, str]]:
        """The rows in the file (cells as text)."""
        try:
            with open(self.path, newline="") as f:
                return list(csv.DictReader(f))
        except FileNotFoundError:
            return []

    def _header_for(self, keys: list[str]) -> list[str]:
        rest = sorted(set(keys) - set(self.keys))
        return [k for k in self.keys if k in keys] + rest

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Replace the file by ``rows`` (flattened records or text rows); no rows: no file."""
        if not rows:
            self.path.unlink(missing_ok=True)
            self.header = []
            return
        cells = [{k: v if isinstance(v, str) else _cell(v) for k, v in flatten(r).items()}
                 for r in rows]
        self.header = self._header_for([k for row in cells for k in row])
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.header, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(cells)
        atomic_write(self.path, buf.getvalue(), fsync=False)

    def append(self, record: dict[str, Any]) -> None:
        """Add one record (flattened), widening the header first if it brings new keys."""
        row = {k: _cell(v) for k, v in flatten(record).items()}
        if not self.header or any(k not in self.header for k in row):
            self.write([*self.rows(), row])
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.header, restval="", lineterminator="\n").writerow(row)


@register_logger
class CsvLogger(MetricsLogger):
    """``steps.csv`` (one row per logged step) and ``epochs.csv`` (one row per epoch, the
    flattened ``metrics.jsonl`` line) in the run directory."""

    name = "csv"

    def __init__(self, start: LoggerStart) -> None:
        super().__init__(start)
        self.steps = CsvTable(start.run_dir / "steps.csv", ("epoch", "step"))
        self.epochs = CsvTable(start.run_dir / "epochs.csv", ("epoch",))
        rows = self.steps.rows()
        kept = [r for r in rows if _step_of(r) <= start.step]
        if len(kept) != len(rows):
            self.steps.write(kept)
        if start.history or self.epochs.path.exists():
            self.epochs.write(start.history)  # the same lines as metrics.jsonl

    def log_step(self, step: int, record: dict[str, Any]) -> None:
        """Append a row to ``steps.csv``."""
        self.steps.append(record)

    def log_epoch(self, step: int, record: dict[str, Any]) -> None:
        """Append a row to ``epochs.csv``."""
        self.epochs.append(record)


def _step_of(row: dict[str, str]) -> float:
    """A ``steps.csv`` row's step (infinite when unreadable, so that the row is dropped)."""
    try:
        return float(int(row.get("step") or ""))
    except ValueError:
        return math.inf


@register_logger
class TensorBoardLogger(MetricsLogger):
    """Scalars under ``RUN_DIR/tensorboard``: ``step/<key>`` for step records and
    ``epoch/<key>`` for epoch records, both against the run step, through
    ``torch.utils.tensorboard.SummaryWriter``. The event file is opened at the first record with
    ``purge_step = start.step + 1``, so TensorBoard hides what an earlier attempt logged beyond
    the resumed checkpoint."""

    name = "tensorboard"
    requires = ("tensorboard", "tensorboard")

    def __init__(self, start: LoggerStart) -> None:
        super().__init__(start)
        # optional heavy dependency: tensorboard (the `tensorboard` extra)
        from torch.utils.tensorboard import SummaryWriter

        self._writer_type = SummaryWriter
        self._writer: Any = None
        self.log_dir = start.run_dir / "tensorboard"

    def _writer_now(self) -> Any:
        if self._writer is None:
            self._writer = self._writer_type(log_dir=str(self.log_dir),
                                             purge_step=self.start.step + 1)
        return self._writer

    def log_step(self, step: int, record: dict[str, Any]) -> None:
        """``step/<key>`` scalars."""
        writer = self._writer_now()
        for key, value in _numbers(record).items():
            if key not in ("epoch", "step"):
                writer.add_scalar(f"step/{key}", value, step)

    def log_epoch(self, step: int, record: dict[str, Any]) -> None:
        """``epoch/<key>`` scalars, then a flush (an epoch is on disk before its checkpoint)."""
        writer = self._writer_now()
        for key, value in _numbers(record).items():
            writer.add_scalar(f"epoch/{key}", value, step)
        writer.flush()

    def close(self, summary: dict[str, Any] | None = None, failed: bool = False) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


_ID_CHARS = string.ascii_lowercase + string.digits


@register_logger
class WandbLogger(MetricsLogger):
    """Weights & Biases: ``wandb.init`` with ``runtime.wandb`` (project, entity, name, group,
    tags, mode; ``dir`` = the run directory, the resolved config as the W&B config). Step
    records are logged as ``step/<key>``, epoch records as ``epoch/<key>``, at the run step; the
    summary goes to the W&B run's summary.

    ``RUN_DIR/wandb/kdlab-wandb.json`` keeps the W&B run id and the last step and epoch sent:
    a resumed run continues that W&B run (``resume="allow"``) and skips what was already sent
    (a resumed kdlab run recomputes the same numbers, so nothing is lost)."""

    name = "wandb"
    requires = ("wandb", "wandb")
    STATE = "kdlab-wandb.json"

    def __init__(self, start: LoggerStart) -> None:
        super().__init__(start)
        # optional heavy dependency: wandb (the `wandb` extra)
        import wandb

        cfg = start.cfg
        wcfg = cfg.runtime.wandb
        self.folder = start.run_dir / "wandb"
        state = self._read_state() if start.resumed else None
        self.state: dict[str, Any] = state or {
            "id": "".join(secrets.choice(_ID_CHARS) for _ in range(8)), "step": 0, "epoch": 0}
        self.enabled = wcfg.mode != "disabled"
        if self.enabled:
            self.folder.mkdir(exist_ok=True)
            self._write_state()
        try:
            self.run = wandb.init(
                project=wcfg.project, entity=wcfg.entity,
                name=wcfg.name or f"{cfg.name}/seed{cfg.seed}", group=wcfg.group,
                tags=list(wcfg.tags) or None, mode=wcfg.mode, dir=str(start.run_dir),
                id=self.state["id"], resume="allow", config=cfg.to_dict(),
                settings=wandb.Settings(silent=True, console="off"))
        except Exception as e:  # wandb's own errors (no login for online mode, ...)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"wandb logger: cannot start the W&B run ({first}); check "
                             "runtime.wandb (mode: offline needs no account)") from e

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads((self.folder / self.STATE).read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) and isinstance(state.get("id"), str) else None

    def _write_state(self) -> None:
        atomic_write(self.folder / self.STATE, json.dumps(self.state) + "\n", fsync=False)

    def _send(self, key: str, position: int, step: int, prefix: str,
              record: dict[str, Any]) -> None:
        if position <= int(self.state.get(key, 0)):
            return  # sent before the run was resumed
        self.run.log({f"{prefix}/{k}": v for k, v in _numbers(record).items()}, step=step)
        self.state[key] = position
        if self.enabled:
            self._write_state()

    def log_step(self, step: int, record: dict[str, Any]) -> None:
        """``step/<key>`` values at ``step`` (unless already sent)."""
        self._send("step", step, step, "step", record)

    def log_epoch(self, step: int, record: dict[str, Any]) -> None:
        """``epoch/<key>`` values at ``step`` (unless this epoch was already sent)."""
        self._send("epoch", int(record["epoch"]), step, "epoch", record)

    def close(self, summary: dict[str, Any] | None = None, failed: bool = False) -> None:
        """The summary's numbers into the W&B summary, then ``finish``."""
        if summary:
            self.run.summary.update(_numbers(summary))
        self.run.finish(exit_code=1 if failed else 0)
