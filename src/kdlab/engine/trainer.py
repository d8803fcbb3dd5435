"""The trainer: teacher training, student baselines and distillation, resumable at every epoch.

One training step (architecture, "keep it this short"), :meth:`Trainer.step`: the task's
forward (teacher under no grad, then student) -> the method's named, weighted loss terms ->
their sum (:func:`kdlab.methods.base.total_loss`) -> backward -> (clip) -> optimizer step, with
the learning rate of the step set by the schedule. Metrics accumulate on the device; the host
synchronises only every ``runtime.log_every`` steps (progress, non-finite check) and at the end
of an epoch. Everything task-specific (batches, model outputs, metrics) lives in the run's
:class:`~kdlab.tasks.base.Task`; the parts are made by :mod:`kdlab.engine.build`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from kdlab.config import ExperimentConfig
from kdlab.core.distributed import (
    all_reduce_max_int,
    barrier,
    broadcast_object,
    gather_objects,
    init_distributed,
    shutdown,
)
from kdlab.core.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    KdlabError,
    RunError,
    RunInterrupted,
)
from kdlab.core.io import file_sha256
from kdlab.core.runtime import (
    autocast,
    configure_determinism,
    configure_threads,
    resolve_amp,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from kdlab.core.signals import WRITE_SIGNALS, child_exits_ignored, handling, signals_deferred
from kdlab.core.torchvision_shim import shim_state
from kdlab.data.build import request_views
from kdlab.engine.build import (
    build_distiller,
    build_lr_schedule,
    build_model,
    build_teacher,
    build_training_optimizer,
    scaled_lr,
    trainable_parameters,
)
from kdlab.engine.guard import NonFiniteGuard
from kdlab.engine.loggers import LoggerStart, RunLoggers, open_loggers, require_logger_packages
from kdlab.engine.meters import EpochMeter
from kdlab.methods.base import requested_views, total_loss
from kdlab.methods.compose import method_display_name
from kdlab.models.checkpoint import load_state_dict_strict
from kdlab.runs.checkpoint import load_latest, remove_checkpoint, save_atomic
from kdlab.runs.rundir import Resume, RunDir
from kdlab.tasks import task_for
from kdlab.tasks.base import Mark, Task

log = logging.getLogger(__name__)

__all__ = ["AUTO_RESUME_ENV", "CHECKPOINT_FORMAT", "Progress", "StepResult", "TrainState",
           "Trainer", "auto_resume_mode", "file_sha256", "scaled_lr"]

CHECKPOINT_FORMAT = 1

#: the environment variable that opts a run into automatic resume (docs/distributed.md).
AUTO_RESUME_ENV = "KDLAB_AUTO_RESUME"

#: Teacher evaluations of this process (:meth:`Trainer._check_teacher`), by the teacher file's
#: sha256 and everything the evaluation depends on: a demo or in-process sweep whose runs share
#: a teacher and a test set evaluates the teacher once. In memory only, so never stale on disk.
_TEACHER_EVALS: dict[tuple[str, ...], dict[str, float]] = {}


def auto_resume_mode(resume: Resume, environ: Mapping[str, str] | None = None) -> Resume:
    """The resume mode of a run: ``resume`` itself, or True (continue the run in the folder if
    there is one, start it otherwise) when ``KDLAB_AUTO_RESUME`` is ``1``/``true``/``yes`` in
    ``environ`` (default ``os.environ``) and ``resume`` is False.

    The opt-in for ``torchrun --max-restarts N`` and schedulers that requeue a job with the
    same command line: a restarted job continues from its newest checkpoint (the step
    checkpoint when it is ahead) without ``--resume`` typed again. An explicit ``--resume``
    ("required") is kept as it is."""
    env = os.environ if environ is None else environ
    opted_in = env.get(AUTO_RESUME_ENV, "").strip().lower() in ("1", "true", "yes")
    return True if opted_in and resume is False else resume


class Progress(Protocol):
    """What the trainer reports to a progress display (the CLI's bar)."""

    def start_epoch(self, epoch: int, total_epochs: int, steps: int) -> None: ...

    def update(self, steps_done: int, info: dict[str, float]) -> None: ...

    def end_epoch(self, record: dict[str, Any], task: Task[Any, Any, Any]) -> None:
        """The epoch's record; ``task`` names its metrics (:attr:`Task.train_metric`,
        :meth:`Task.metric`)."""


@dataclass
class TrainState:
    """Everything that changes during training and is restored on resume.

    ``best`` is the best value so far of the task's ``best_metric`` (None before the first
    evaluation), reached at ``best_epoch``: on the validation set when ``data.val_fraction`` >
    0, else on the test set.
    """

    epoch: int = 0
    best: float | None = None
    best_epoch: int = 0
    skipped_steps: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StepResult:
    """What one training step returns: the named, weighted loss terms, their values stacked in
    the terms' order (float32, detached), the total loss, the student's output, and whether the
    step was skipped (``runtime.non_finite: skip``) instead of applied."""

    terms: dict[str, Tensor]
    values: Tensor
    loss: Tensor
    output: Any
    skipped: bool = False


class Trainer:
    """Runs one experiment into a run directory. ``run()`` returns the summary dict."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: str | Path,
        resume: Resume = False,
        progress: Progress | None = None,
        require_teacher: bool | None = None,
        stop_after: int | None = None,
        allow_teacher_change: bool = False,
    ) -> None:
        self.cfg = cfg
        self.stop_after = stop_after
        #: resume even if the teacher checkpoint's sha256 differs from the one recorded at the
        #: start (the change is then recorded in teacher.json).
        self.allow_teacher_change = allow_teacher_change
        #: the signal (SIGTERM/SIGINT) that asked a run with step checkpoints to stop
        self._stop_signal: int | None = None
        #: where to continue inside an epoch (from a step checkpoint), or None
        self._mid_epoch: dict[str, Any] | None = None
        self.run_dir = RunDir(run_dir)
        #: False, "required" (--resume) or True; KDLAB_AUTO_RESUME=1 turns False into True
        self.resume = auto_resume_mode(resume)
        self.progress = progress
        #: the metrics loggers (``runtime.loggers``), opened at the end of setup on rank 0
        self.loggers = RunLoggers([])
        if require_teacher is True and cfg.teacher is None:
            raise ConfigError("distillation needs a teacher: set teacher.arch and "
                              "teacher.checkpoint")
        if require_teacher is False and cfg.teacher is not None:
            raise ConfigError("`kdlab train` trains without a teacher; remove the teacher "
                              "section or use `kdlab distill`")

    # ------------------------------------------------------------------ setup
    def setup(self) -> str:
        """Build every part of the run; returns "new", "resume" or "finished"."""
        cfg = self.cfg
        require_logger_packages(cfg.runtime.loggers)  # a missing package: before any work
        self.dist = init_distributed(cfg.runtime.device)
        mode = self._prepare_run_dir()
        if mode == "finished":
            return mode
        self._configure_runtime()
        self.task = task_for(cfg)
        self._build_data_and_models()
        self._build_optimization()
        self._wrap_for_speed()
        self.state = TrainState()
        if mode == "resume":
            self._restore()
        else:
            self._record_start()
        self.loggers = self._open_loggers(mode)
        return mode

    def _build_data_and_models(self) -> None:
        """The task's loaders, the student, the teacher and the distiller (with its views)."""
        cfg = self.cfg
        self.data = self.task.build_data(
            cfg.data, seed=cfg.seed, device=self.device,
            channels_last=cfg.runtime.channels_last, rank=self.dist.rank,
            world_size=self.dist.world_size)
        self.train_loader, self.test_loader = self.data.train_loader, self.data.test_loader
        #: held-out validation images (data.val_fraction > 0): they choose the best epoch
        self.val_loader = getattr(self.data, "val_loader", None)
        self.student = build_model(self.task, cfg.student, self.data, self.device,
                                   self.memory_format)
        self.teacher = build_teacher(self.task, cfg.teacher, self.data, self.device,
                                     self.memory_format)
        if len(self.train_loader) == 0:
            raise ConfigError(f"config key 'data.batch_size': {cfg.data.batch_size} is larger "
                              f"than the training set ({self.data.train_size} images)")
        self.distiller = build_distiller(cfg, self.task, self.student, self.teacher, self.data,
                                         self.device)
        # MLKD: ("weak", "strong"); under torchrun it gathers the global batch's logits itself
        views = requested_views(self.distiller)
        self.train_loader = request_views(self.train_loader, views, seed=cfg.seed,
                                          rank=self.dist.rank)
        self._sync_batchnorm()

    def _build_optimization(self) -> None:
        """The trainable parameters, the optimizer, the learning-rate schedule, the gradient
        clipping norm and the fp16 gradient scaler."""
        cfg = self.cfg
        self.trainable = trainable_parameters(self.student, self.distiller)
        self.optim = build_training_optimizer(cfg, self.trainable)
        self.optimizer = self.optim.optimizer
        self.schedule = build_lr_schedule(cfg, len(self.train_loader))
        self.clip = (self.distiller.default_clip_grad_norm
                     if cfg.optim.clip_grad_norm == "auto" else cfg.optim.clip_grad_norm)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and self.device.type == "cuda")

    def _open_loggers(self, mode: str) -> RunLoggers:
        """Rank 0's metrics loggers, continuing from the checkpoint the run resumes from."""
        if not self.is_main:
            return RunLoggers([])
        steps, mid, s = len(self.train_loader), self._mid_epoch, self.state
        step = (int(mid["epoch"]) - 1) * steps + int(mid["step"]) if mid else s.epoch * steps
        return open_loggers(self.cfg.runtime.loggers, LoggerStart(
            self.run_dir.path, self.cfg, steps, s.epoch, step, list(s.history),
            resumed=mode == "resume"))

    def _configure_runtime(self) -> None:
        """Threads, determinism, seeds, device, autocast dtype and memory format."""
        rt = self.cfg.runtime
        configure_threads(rt.threads)
        configure_determinism(rt.deterministic)
        seed_everything(self.cfg.seed)
        self.device = resolve_device(rt.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.amp_dtype = resolve_amp(rt.amp, self.device)
        self.memory_format = (torch.channels_last if rt.channels_last
                              else torch.contiguous_format)

    def _sync_batchnorm(self) -> None:
        """SyncBatchNorm in the student of a distributed GPU run (``runtime.sync_batchnorm``)."""
        if not (self.dist.enabled and self.cfg.runtime.sync_batchnorm):
            return
        if self.device.type != "cuda":
            raise ConfigError("config key 'runtime.sync_batchnorm': SyncBatchNorm works only on "
                              "GPUs in PyTorch; set it to false for CPU runs")
        self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)

    def _wrap_for_speed(self) -> None:
        """The modules the step calls: DDP wrappers (distributed) and torch.compile."""
        self.student_fwd: nn.Module = self.student
        self.teacher_fwd: nn.Module | None = self.teacher
        self.distiller_fwd: nn.Module = self.distiller
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # a task whose training pass leaves some trainable parameters unused (detection:
            # the backbone's classifier) says so with ``ddp_find_unused_parameters``
            self.student_fwd = DistributedDataParallel(
                self.student, device_ids=ids,
                find_unused_parameters=self.task.ddp_find_unused_parameters)
            if any(p.requires_grad for p in self.distiller.parameters()):
                # buffers are not broadcast: CRD keeps its memory bank replicated itself
                self.distiller_fwd = DistributedDataParallel(
                    self.distiller, device_ids=ids, broadcast_buffers=False)
        if self.cfg.runtime.compile:
            mode = self.cfg.runtime.compile_mode
            self.student_fwd = torch.compile(self.student_fwd, mode=mode)
            if self.teacher is not None:
                self.teacher_fwd = torch.compile(self.teacher, mode=mode)

    def _record_start(self) -> None:
        """A new run records its method and the torchvision shim's state (env.json is written
        before the models are built), and checks its teacher."""
        if self.is_main:
            self.run_dir.write_json("method.json", self.distiller.describe())
            self.run_dir.write_json("env.json", {**self.run_dir.read_json("env.json"),
                                                 "torchvision_shim": shim_state()})
            spec = self._input_spec()
            if spec is not None:
                self.run_dir.write_json("input.json", spec)
        if self.teacher is not None:
            self._check_teacher()

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes the run directory."""
        return self.dist.is_main

    def _prepare_run_dir(self) -> str:
        """Rank 0 locks and prepares the run directory; its verdict (or error) reaches every
        rank. The lock is released by :meth:`run`."""
        if not self.dist.enabled:
            self.run_dir.acquire_lock()
            return self.run_dir.prepare(self.cfg, self.resume)
        result: tuple[str, str | None] = ("", None)
        if self.dist.is_main:
            try:
                self.run_dir.acquire_lock()
                result = (self.run_dir.prepare(self.cfg, self.resume), None)
            except KdlabError as e:
                result = ("error", str(e))
        mode, error = broadcast_object(result, self.dist)  # type: ignore[misc]
        if error is not None:
            raise RunError(error)
        return mode

    def _check_teacher(self) -> None:
        """Evaluate the teacher once and record it; stop if far below its expected accuracy. A
        teacher file already evaluated in this process on the same data, precision, device and
        world size is not evaluated again (:data:`_TEACHER_EVALS`)."""
        assert self.teacher is not None and self.cfg.teacher is not None
        tcfg = self.cfg.teacher
        metric = self.task.best_metric
        sha = file_sha256(tcfg.checkpoint) if tcfg.checkpoint else None
        key = None if sha is None else (
            sha, tcfg.arch, self.task.name, self.cfg.data.model_dump_json(),
            str(self.amp_dtype), str(self.device), str(self.dist.world_size))
        ev = _TEACHER_EVALS.get(key) if key is not None else None
        if ev is None:
            ev = self.task.evaluate(self.teacher, self.test_loader, self.device, self.amp_dtype,
                                    self.dist)
            if key is not None:
                _TEACHER_EVALS[key] = dict(ev)
        info: dict[str, Any] = {"arch": tcfg.arch, "checkpoint": tcfg.checkpoint,
                                **_reported(ev, metric),
                                f"expected_{metric}": tcfg.expected_accuracy}
        if sha is not None:
            info["sha256"] = sha
        if self.is_main:
            self.run_dir.write_json("teacher.json", info)
        log.info("teacher %s: %s %.2f", tcfg.arch, metric, ev[metric])
        self._teacher_guard(ev[metric])

    def _teacher_guard(self, value: float | None) -> None:
        """Stop when the teacher is far below ``teacher.expected_accuracy``."""
        tcfg = self.cfg.teacher
        if tcfg is None or tcfg.expected_accuracy is None or value is None:
            return
        metric = self.task.metric(self.task.best_metric)
        floor = tcfg.expected_accuracy - tcfg.accuracy_tolerance
        ceiling = tcfg.expected_accuracy + tcfg.accuracy_tolerance
        if (value < floor) if metric.higher_is_better else (value > ceiling):
            raise RunError(
                f"teacher {tcfg.arch} from {tcfg.checkpoint} reaches {value:.2f} "
                f"{metric.label} on the test set, expected {tcfg.expected_accuracy:.2f} "
                f"(tolerance {tcfg.accuracy_tolerance}); the checkpoint does not match its "
                "claimed accuracy"
            )

    # ------------------------------------------------------------------ checkpoint
    def _checkpoint_state(self) -> dict[str, Any]:
        s = self.state
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": "kdlab-train-state",
            "fingerprint": self.cfg.fingerprint(),
            "task": self.task.name,
            "arch": self.cfg.student.arch,
            "num_classes": self.data.num_classes,
            "in_channels": self.data.in_channels,
            "epoch": s.epoch,
            "global_step": s.global_step,
            "best_metric": self.task.best_metric,
            "best": s.best,
            "best_epoch": s.best_epoch,
            "skipped_steps": s.skipped_steps,
            "model": self.student.state_dict(),
            "distiller": self.distiller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
        }

    def _latest_state(self) -> tuple[dict[str, Any], Path] | None:
        """The newest training state: the step checkpoint when it is ahead of ``last.pt``."""
        found = load_latest(self.run_dir.last_checkpoint)
        step = load_latest(self.run_dir.step_checkpoint)
        last_epoch = -1 if found is None else int(found[0]["epoch"])
        if step is not None and int(step[0]["epoch"]) >= last_epoch:
            return step
        return found

    def _restore(self) -> None:
        found = self._latest_state()
        if found is None:
            log.warning("no checkpoint in %s yet: starting the run from epoch 1", self.run_dir.path)
            self._check_teacher_identity()
            return
        ckpt, path = found
        if ckpt.get("kind") != "kdlab-train-state":
            raise CheckpointError(f"{path} is not a kdlab training checkpoint")
        if ckpt.get("fingerprint") not in self.run_dir.accepted_fingerprints():
            raise CheckpointError(f"{path} belongs to a run with another config")
        load_state_dict_strict(self.student, ckpt["model"], str(path))
        self.distiller.load_state_dict(ckpt["distiller"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self._mid_epoch = ckpt.get("mid_epoch")
        self._restore_rank_state(ckpt, path)
        s = self.state
        s.epoch, s.global_step = int(ckpt["epoch"]), int(ckpt["global_step"])
        if "best_metric" in ckpt:
            s.best = None if ckpt["best"] is None else float(ckpt["best"])
        else:  # kdlab 0.1: "best_top1", -1 before the first evaluation
            s.best = float(ckpt["best_top1"]) if ckpt["best_top1"] >= 0 else None
        s.best_epoch = int(ckpt["best_epoch"])
        s.skipped_steps = int(ckpt["skipped_steps"])
        if self.is_main:
            self.run_dir.truncate_metrics(s.epoch)
        s.history = [r for r in self.run_dir.read_metrics() if r.get("epoch", 0) <= s.epoch]
        record = ckpt.get("record")
        if (self.is_main and isinstance(record, dict)
                and not any(r.get("epoch") == s.epoch for r in s.history)):
            # killed after the checkpoint was written but before (or while) its metrics line was
            self.run_dir.append_metrics(record)
            s.history.append(record)
        where = (f"epoch {s.epoch + 1}, step {self._mid_epoch['step']}" if self._mid_epoch
                 else f"epoch {s.epoch}")
        log.info("resumed %s from %s at %s", self.run_dir.path, path.name, where)
        self._check_teacher_identity()

    def _restore_rank_state(self, ckpt: dict[str, Any], path: Path) -> None:
        """This rank's own RNG streams (and, from a step checkpoint, meter sums and guard) from
        ``ckpt["ranks"]`` / ``ckpt["mid_epoch"]["ranks"]``, written by a run of as many ranks.

        A step checkpoint continues the epoch only with the number of processes that wrote it
        (otherwise :class:`CheckpointError`); an epoch checkpoint of another world size (or one
        without per-rank states) gives every rank rank 0's RNG streams."""
        mid, rank, world = self._mid_epoch, self.dist.rank, self.dist.world_size
        if mid is not None:
            written = int(mid.get("world_size", 1))
            if written != world:
                raise CheckpointError(
                    f"{path} stopped mid-epoch in a run of {written} process(es); resume it "
                    f"with {written}, or delete it to resume from the last epoch checkpoint")
            if world > 1:
                mine = mid["ranks"][rank]
                set_rng_state(mine["rng"])
                self._mid_epoch = {**mid, "meter": mine["meter"], "guard": mine["guard"]}
            return
        ranks = ckpt.get("ranks")
        if world > 1 and isinstance(ranks, list) and len(ranks) == world:
            set_rng_state(ranks[rank]["rng"])

    def _check_teacher_identity(self) -> None:
        """On resume: the teacher file must be the one the run started with (sha256), and the
        teacher accuracy guard applies as at the start."""
        tcfg = self.cfg.teacher
        if tcfg is None:
            return
        teacher_json = self.run_dir.path / "teacher.json"
        if not teacher_json.exists():  # stopped before the teacher was checked: check it now
            self._check_teacher()
            return
        info = self.run_dir.read_json("teacher.json")
        recorded, current = info.get("sha256"), file_sha256(tcfg.checkpoint) if tcfg.checkpoint \
            else None
        if recorded != current:
            if not self.allow_teacher_change:
                raise RunError(
                    f"the teacher checkpoint {tcfg.checkpoint} changed since the run started "
                    f"(sha256 {str(current)[:12]} now, {str(recorded)[:12]} recorded in "
                    f"{teacher_json}); restore the original file, or pass "
                    "--allow-teacher-change to continue with this one (it is recorded)")
            log.warning("the teacher checkpoint changed since the run started; continuing "
                        "with it as asked (--allow-teacher-change)")
            changes = [*info.get("changes", []), {"from_sha256": recorded, "to_sha256": current,
                                                  "time": time.time(),
                                                  "after_epoch": self.state.epoch}]
            self._check_teacher()
            if self.is_main:
                self.run_dir.write_json("teacher.json", {**self.run_dir.read_json(
                    "teacher.json"), "changes": changes})
            return
        self._teacher_guard(info.get(self.task.best_metric))

    # ------------------------------------------------------------------ training
    def step(self, batch: Any, epoch: int, *, t: int | None = None,
             guard: NonFiniteGuard | None = None, mark: Mark | None = None) -> StepResult:
        """One training step on ``batch`` (the only implementation of the step in kdlab).

        ``t``: the step's position in the run, which sets its learning rate (None: leave the
        learning rate as it is). ``guard``: the epoch's non-finite guard (``skip`` mode skips a
        bad step here, before its update). ``mark``: called with each finished part's name
        ("teacher_fwd", "student_fwd", "loss", "backward_step"), for timing.
        """
        if t is not None:
            self.schedule.apply(self.optimizer, t)
        terms, output = self.forward_terms(batch, epoch, mark)
        loss = total_loss(terms)
        values = torch.stack([v.detach().float() for v in terms.values()])
        if mark is not None:
            mark("loss")
        if guard is not None and guard.skip(terms, values):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(terms, values, loss, output, skipped=True)
        self.backward_step(terms, loss)
        if mark is not None:
            mark("backward_step")
        return StepResult(terms, values, loss, output)

    def forward_terms(self, batch: Any, epoch: int, mark: Mark | None = None
                      ) -> tuple[dict[str, Tensor], Any]:
        """The task's forward (teacher only when the method reads it), then the method's named,
        weighted loss terms; returns ``(terms, student output)``."""
        teacher = self.teacher_fwd if self.distiller.uses_teacher else None
        with autocast(self.device, self.amp_dtype):
            out_s, out_t = self.task.forward(self.student_fwd, teacher, batch, mark)
        terms = self.distiller_fwd(*self.task.distill_inputs(out_s, out_t, batch), epoch)
        return {**self.task.task_terms(out_s), **terms}, out_s

    def backward_step(self, terms: dict[str, Tensor], loss: Tensor) -> None:
        """Backward pass and optional gradient-norm clipping (both through the optimizer's
        hooks), optimizer step (no host sync)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optim.backward(terms, loss, self.scaler)
        if self.clip is not None:
            self.scaler.unscale_(self.optimizer)
            self.optim.clip_grad_norm(self.trainable, self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state.global_step += 1

    def train_epoch(self, epoch: int, resume: dict[str, Any] | None = None) -> dict[str, Any]:
        """One epoch over the training loader (from ``resume``, a step checkpoint's position
        and sums, when continuing mid-epoch); returns the epoch's training record."""
        self.student.train()
        self.distiller.train()
        start = 0 if resume is None else int(resume["step"])
        self.train_loader.set_epoch(epoch, start_batch=start)
        steps, log_every = len(self.train_loader), self.cfg.runtime.log_every
        meter = EpochMeter(self.task.train_meter(self.device), self.device)
        guard = self._guard(epoch)
        if resume is not None:
            meter.load_state_dict(resume["meter"])
            guard.load_state_dict(resume["guard"])
        progress = self.progress if self.is_main else None
        if progress:
            progress.start_epoch(epoch, self.cfg.optim.epochs, steps)
        for i, batch in self._batches(epoch, start, steps, meter, guard):
            result = self.step(batch, epoch, t=(epoch - 1) * steps + i - 1, guard=guard)
            if not result.skipped:
                guard.observe(result.terms, result.values)
                meter.add(result.terms, result.values, result.output, batch)
            if i % log_every == 0 or i == steps:
                guard.check(self.dist)
                if progress:
                    progress.update(i, meter.progress())
                self.loggers.log_step(epoch, (epoch - 1) * steps + i, meter,
                                      self.optimizer.param_groups[0]["lr"])
            self._maybe_checkpoint_step(epoch, i, steps, meter, guard)
        self.state.skipped_steps = guard.total_skipped
        return meter.finish(self.dist, guard.skipped)

    def _batches(self, epoch: int, start: int, steps: int, meter: EpochMeter,
                 guard: NonFiniteGuard) -> Iterator[tuple[int, Any]]:
        """The epoch's training batches, numbered from ``start + 1``.

        When a signal has asked the run to stop and the next batch cannot be fetched (a loader
        worker died: :class:`DatasetError`), the run still stops as asked, at this step
        boundary: a step checkpoint of the steps done so far (if any), then
        :class:`RunInterrupted`. Without a pending stop the error propagates."""
        i, batches = start, iter(self.train_loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except DatasetError as e:
                if self._stop_signal is None:
                    raise
                log.warning("stopping at epoch %d, step %d as asked; the next batch could not "
                            "be fetched (%s)", epoch, i, e)
                if i > start:
                    self._maybe_checkpoint_step(epoch, i, steps, meter, guard)  # raises
                raise RunInterrupted(self._stop_signal) from None
            i += 1
            yield i, batch

    def _maybe_checkpoint_step(self, epoch: int, step: int, steps: int, meter: EpochMeter,
                               guard: NonFiniteGuard) -> None:
        """Write the step checkpoint every ``runtime.checkpoint_every_steps`` steps, and when a
        signal asked the run to stop (then stop: :class:`RunInterrupted`). Stop signals and a
        loader worker's exit (SIGCHLD) are held until the write is complete.

        Under torchrun the stop request is agreed on every step (:meth:`_agree_on_stop`), so a
        SIGTERM to any one rank stops every rank at the same step boundary; every rank's RNG
        streams, meter sums and guard reach rank 0 (``mid_epoch["ranks"]``), which writes the
        one step checkpoint; the ranks stop only once it is on disk."""
        every = self.cfg.runtime.checkpoint_every_steps
        if every <= 0 or step >= steps:
            return
        stop = self._agree_on_stop()
        if not (step % every == 0 or stop):
            return
        guard.check(self.dist)  # never checkpoint a state with a non-finite loss in it
        self.state.skipped_steps = guard.total_skipped
        mid: dict[str, Any] = {"epoch": epoch, "step": step, "meter": meter.state_dict(),
                               "guard": guard.state_dict(), "world_size": self.dist.world_size}
        ranks = gather_objects({"rng": rng_state(), "meter": mid["meter"],
                                "guard": mid["guard"]}, self.dist)
        if self.dist.enabled:
            mid["ranks"] = ranks
        if self.is_main:
            state = self._checkpoint_state()
            state["mid_epoch"] = mid
            with signals_deferred(WRITE_SIGNALS):
                save_atomic(state, self.run_dir.step_checkpoint)
        if stop:
            barrier(self.dist)  # every rank stops after rank 0's checkpoint is complete
            log.info("stopped at epoch %d, step %d of %d (step checkpoint written)", epoch,
                     step, steps)
            raise RunInterrupted(self._stop_signal or signal.SIGTERM)

    def _agree_on_stop(self) -> bool:
        """Whether any rank was asked to stop (SIGTERM/SIGINT); in a distributed run with step
        checkpoints the ranks all-reduce their stop flag (the largest signal number wins, so
        SIGTERM over SIGINT) and every rank adopts the result. A collective then: every rank
        calls it at the same step."""
        if not self.dist.enabled or self.cfg.runtime.checkpoint_every_steps <= 0:
            return self._stop_signal is not None
        device = self.device if self.device.type == "cuda" else None
        agreed = all_reduce_max_int(self._stop_signal or 0, self.dist, device)
        if agreed and self._stop_signal is None:
            log.info("another rank was asked to stop (%s): stopping after this step",
                     signal.Signals(agreed).name)
            self._stop_signal = agreed
        return agreed > 0

    def _guard(self, epoch: int) -> NonFiniteGuard:
        rt = self.cfg.runtime

        def kept() -> str:
            last = self.state.epoch
            return (f"the last good checkpoint (epoch {last}) is kept in "
                    f"{self.run_dir.last_checkpoint.parent}" if last > 0
                    else "no checkpoint was written yet")

        return NonFiniteGuard(rt.non_finite, rt.max_skipped_steps, self.state.skipped_steps,
                              epoch, self.device, kept)

    def run(self) -> dict[str, Any]:
        """Train to ``optim.epochs`` (or continue a resumed run); returns the summary."""
        try:
            mode = self.setup()
        except BaseException:
            self.run_dir.release_lock(abandon=True)  # a failed start leaves nothing behind
            raise
        if mode == "finished":
            self.run_dir.release_lock()
            log.info("run %s is already finished", self.run_dir.path)
            return self.run_dir.read_json("summary.json")
        if self.is_main:
            self.run_dir.set_status("running", epoch=self.state.epoch)
        t_start = time.perf_counter()
        try:
            self._train_epochs()
            return self._finish(time.perf_counter() - t_start)
        finally:
            self.loggers.close()  # no-op when closed above
            self.run_dir.release_lock()  # last: after the final status (rank 0 holds it)

    def _train_epochs(self) -> None:
        """The epochs still to run; status.json records how they end."""
        try:
            with self._deferred_stop_signals():
                for epoch in range(self.state.epoch + 1, self.cfg.optim.epochs + 1):
                    self._run_epoch(epoch)
                    if self.stop_after is not None and epoch >= self.stop_after:
                        break
        except KeyboardInterrupt as e:
            self.loggers.close(failed=True)
            if self.is_main:
                how = "SIGTERM" if getattr(e, "signum", 2) == signal.SIGTERM else "SIGINT"
                self.run_dir.set_status("interrupted", signal=how, epoch=self.state.epoch)
            raise
        except BaseException as e:
            self.loggers.close(failed=True)
            if self.is_main:
                self.run_dir.set_status("failed", error=f"{type(e).__name__}: {e}",
                                        epoch=self.state.epoch)
            raise
        finally:
            self._leave_process_group()

    def _finish(self, wall_time: float) -> dict[str, Any]:
        """The summary; a finished run writes it and says "finished", a stopped one "stopped"."""
        summary = self._summary(wall_time)
        self.loggers.close(summary)
        if self.state.epoch < self.cfg.optim.epochs:
            if self.is_main:
                self.run_dir.set_status("stopped", epoch=self.state.epoch)
            log.info("stopped after epoch %d of %d; continue with --resume", self.state.epoch,
                     self.cfg.optim.epochs)
            return summary
        if self.is_main:
            self.run_dir.write_json("summary.json", summary)
            self.run_dir.set_status("finished", epoch=self.state.epoch)
        return summary

    @contextlib.contextmanager
    def _deferred_stop_signals(self) -> Iterator[None]:
        """With step checkpoints on, SIGTERM and SIGINT stop the run at the next step boundary
        after a step checkpoint (a second Ctrl-C stops at once); without, they act at once.
        Once a stop is asked for, a loader worker's death (SIGCHLD) no longer raises from the
        middle of a step: the run stops at the step boundary as asked."""
        if self.cfg.runtime.checkpoint_every_steps <= 0:
            yield
            return
        with contextlib.ExitStack() as stack:

            def request_stop(signum: int, frame: Any) -> None:
                if self._stop_signal is not None and signum == signal.SIGINT:
                    raise RunInterrupted(signum)
                if self._stop_signal is None:
                    stack.enter_context(child_exits_ignored())
                self._stop_signal = signum
                log.info("%s received: stopping after the current step",
                         signal.Signals(signum).name)

            stack.enter_context(handling(request_stop))
            yield

    def _leave_process_group(self) -> None:
        """Free the DDP wrappers, then leave the process group (distributed runs).

        A DDP module keeps the process group (and gloo's transport threads) alive after
        ``destroy_process_group``; left to interpreter shutdown, tearing those threads down
        aborts the process now and then ("terminate called without an active exception").
        """
        if not self.dist.enabled:
            return
        if hasattr(self, "student_fwd"):
            self.student_fwd, self.distiller_fwd = self.student, self.distiller
            gc.collect()
        shutdown(self.dist)

    def _run_epoch(self, epoch: int) -> None:
        self.schedule.apply(self.optimizer, (epoch - 1) * len(self.train_loader))
        record: dict[str, Any] = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
        resume, self._mid_epoch = self._mid_epoch, None
        if resume is not None and int(resume["epoch"]) != epoch:
            resume = None  # a step checkpoint of another epoch (not reached here)
        record.update(self.train_epoch(epoch, resume))
        record.update(self.distiller.epoch_metrics())  # e.g. CTKD's learned temperature
        s = self.state
        metric = self.task.best_metric
        if epoch % self.cfg.runtime.eval_every == 0 or epoch == self.cfg.optim.epochs:
            t0 = time.perf_counter()
            ev = self.task.evaluate(self.student, self.test_loader, self.device, self.amp_dtype,
                                    self.dist)
            record.update({f"test_{k}": v for k, v in ev.items() if k != "count"})
            chosen, extra = ev, {}  # what chooses the best epoch: validation when there is one
            if self.val_loader is not None:
                chosen = self.task.evaluate(self.student, self.val_loader, self.device,
                                            self.amp_dtype, self.dist)
                record.update({f"val_{k}": v for k, v in chosen.items() if k != "count"})
                extra = {f"val_{metric}": chosen[metric]}
            record["eval_time_s"] = time.perf_counter() - t0
            if self.task.is_better(chosen[metric], s.best):
                s.best, s.best_epoch = chosen[metric], epoch
                if self.is_main:
                    self._save_best(epoch, {metric: ev[metric], **extra})
        if self.val_loader is None:
            record[f"best_{metric}"] = s.best
        else:  # best_<metric> stays "best on test so far"; the choice is best_val_<metric>
            record[f"best_val_{metric}"] = s.best
            record[f"best_{metric}"] = self._best_test_so_far(record)
        s.epoch = epoch
        # every rank's RNG streams travel with the checkpoint (exact resume under torchrun)
        ranks = gather_objects({"rng": rng_state()}, self.dist) if self.dist.enabled else None
        stop = self._agree_on_stop()
        if not self.is_main:
            s.history.append(record)
            if stop:
                barrier(self.dist)  # after rank 0's checkpoint
                raise RunInterrupted(self._stop_signal or signal.SIGTERM)
            return
        # logged before the checkpoint: a resume drops what lies beyond its checkpoint
        self.loggers.log_epoch(epoch * len(self.train_loader), record)
        state = self._checkpoint_state()
        # the epoch's metrics line travels with the checkpoint: a kill between the checkpoint's
        # rename and the append below must not lose it (restored by _restore)
        state["record"] = record
        if ranks is not None:
            state["ranks"] = ranks
        # a Ctrl-C (or a loader worker's exit) here acts after the epoch is recorded
        with signals_deferred(WRITE_SIGNALS):
            try:
                save_atomic(state, self.run_dir.last_checkpoint)
            except BaseException:
                s.epoch = epoch - 1  # status.json must name the epoch of the checkpoint on disk
                raise
            self.run_dir.append_metrics(record)
            s.history.append(record)
        remove_checkpoint(self.run_dir.step_checkpoint)  # the epoch's checkpoint supersedes it
        if self.progress:
            self.progress.end_epoch(record, self.task)
        if stop:
            barrier(self.dist)  # the other ranks stop after this checkpoint
            raise RunInterrupted(self._stop_signal or signal.SIGTERM)

    def _input_spec(self) -> dict[str, Any] | None:
        """The data's input description (:mod:`kdlab.data.input_spec`) as a dict, if it has
        one."""
        spec = getattr(self.data, "input_spec", None)
        return None if spec is None else spec.to_dict()

    def _save_best(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Write ``best.pt``: the student's weights of ``epoch`` and the metrics that chose it
        (stop signals and a loader worker's exit are held until the write is complete)."""
        with signals_deferred(WRITE_SIGNALS):
            save_atomic(
                {"kind": "kdlab-weights", "arch": self.cfg.student.arch,
                 "task": self.task.name, "num_classes": self.data.num_classes,
                 "in_channels": self.data.in_channels, "epoch": epoch, **metrics,
                 "input": self._input_spec(), "model": self.student.state_dict()},
                self.run_dir.best_checkpoint, keep_previous=False)

    def _best_test_so_far(self, record: dict[str, Any]) -> float | None:
        """The best test value of the task's metric over the history and ``record``."""
        best: float | None = None
        for r in [*self.state.history, record]:
            value = r.get(f"test_{self.task.best_metric}")
            if value is not None and self.task.is_better(value, best):
                best = value
        return best

    def _summary(self, wall_time: float) -> dict[str, Any]:
        s = self.state
        metric = self.task.best_metric
        evals = [r for r in s.history if f"test_{metric}" in r]
        last = evals[-1] if evals else {}
        names = [k[len("test_"):] for k in last if k.startswith("test_") and k != "test_loss"]
        rates = [r["train_img_per_s"] for r in s.history if "train_img_per_s" in r]
        summary: dict[str, Any] = {
            "name": self.cfg.name,
            "task": self.task.name,
            "method": method_display_name(self.cfg.method) if self.teacher else "vanilla",
            "student": self.cfg.student.arch,
            "teacher": None if self.cfg.teacher is None else self.cfg.teacher.arch,
            "dataset": self.task.dataset_label(self.cfg.data),
            "seed": self.cfg.seed,
            "epochs": s.epoch,
            "best_epoch": s.best_epoch,
            "train_img_per_s": sum(rates) / len(rates) if rates else math.nan,
            "wall_time_s": wall_time,
            "skipped_steps": s.skipped_steps,
        }
        for name in names or [metric]:
            summary[f"last_{name}"] = last.get(f"test_{name}", math.nan)
            summary[f"best_{name}"] = self.task.metric(name).best(r[f"test_{name}"] for r in evals)
        if self.val_loader is None:
            summary[f"best_{metric}"] = math.nan if s.best is None else s.best
        else:  # best_epoch was chosen on validation; the test set is scored there and at the end
            at = next((r for r in evals if r.get("epoch") == s.best_epoch), {})
            summary[f"best_val_{metric}"] = math.nan if s.best is None else s.best
            summary[f"last_val_{metric}"] = last.get(f"val_{metric}", math.nan)
            for name in names or [metric]:
                summary[f"test_{name}_at_best"] = at.get(f"test_{name}", math.nan)
        teacher_json = self.run_dir.path / "teacher.json"
        if teacher_json.exists():
            summary[f"teacher_{metric}"] = self.run_dir.read_json("teacher.json")[metric]
        return summary


def _reported(metrics: dict[str, float], best_metric: str) -> dict[str, float]:
    """The evaluation figures worth recording for a teacher: not the count, nor the loss
    unless the task's best metric is the loss."""
    return {k: v for k, v in metrics.items()
            if k != "count" and (k != "loss" or k == best_metric)}
