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

import gc
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from kdlab.config import ExperimentConfig
from kdlab.engine.build import (
    build_distiller,
    build_lr_schedule,
    build_model,
    build_teacher,
    build_training_optimizer,
    scaled_lr,
    trainable_parameters,
)
from kdlab.engine.checkpoint import load_latest, save_atomic
from kdlab.engine.distributed import broadcast_object, init_distributed, shutdown
from kdlab.engine.guard import NonFiniteGuard
from kdlab.engine.meters import EpochMeter
from kdlab.engine.rundir import RunDir
from kdlab.engine.runtime import (
    autocast,
    configure_determinism,
    configure_threads,
    resolve_amp,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from kdlab.errors import CheckpointError, ConfigError, KdlabError, RunError
from kdlab.methods.base import total_loss
from kdlab.methods.compose import method_display_name
from kdlab.models.checkpoint import load_state_dict_strict
from kdlab.tasks import get_task
from kdlab.tasks.base import Mark

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_FORMAT", "Progress", "StepResult", "TrainState", "Trainer",
           "file_sha256", "scaled_lr"]

CHECKPOINT_FORMAT = 1


class Progress(Protocol):
    """What the trainer reports to a progress display (the CLI's bar)."""

    def start_epoch(self, epoch: int, total_epochs: int, steps: int) -> None: ...

    def update(self, steps_done: int, info: dict[str, float]) -> None: ...

    def end_epoch(self, record: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """Everything that changes during training and is restored on resume.

    ``best`` is the best value so far of the task's ``best_metric`` (None before the first
    evaluation), reached at ``best_epoch``.
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


def file_sha256(path: str | Path) -> str:
    """sha256 of a file (recorded for teacher checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Trainer:
    """Runs one experiment into a run directory. ``run()`` returns the summary dict."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: str | Path,
        resume: bool = False,
        progress: Progress | None = None,
        require_teacher: bool | None = None,
        stop_after: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.stop_after = stop_after
        self.run_dir = RunDir(run_dir)
        self.resume = resume
        self.progress = progress
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
        self.dist = init_distributed(cfg.runtime.device)
        mode = self._prepare_run_dir()
        if mode == "finished":
            return mode
        self._configure_runtime()
        self.task = get_task(cfg.task)
        self.data = self.task.build_data(
            cfg.data, seed=cfg.seed, device=self.device,
            channels_last=cfg.runtime.channels_last, rank=self.dist.rank,
            world_size=self.dist.world_size)
        self.train_loader, self.test_loader = self.data.train_loader, self.data.test_loader
        self.student = build_model(self.task, cfg.student, self.data, self.device,
                                   self.memory_format)
        self.teacher = build_teacher(self.task, cfg.teacher, self.data, self.device,
                                     self.memory_format)
        if len(self.train_loader) == 0:
            raise ConfigError(f"config key 'data.batch_size': {cfg.data.batch_size} is larger "
                              f"than the training set ({self.data.train_size} images)")
        self.distiller = build_distiller(cfg, self.task, self.student, self.teacher, self.data,
                                         self.device)
        self._sync_batchnorm()
        self.trainable = trainable_parameters(self.student, self.distiller)
        self.optim = build_training_optimizer(cfg, self.trainable)
        self.optimizer = self.optim.optimizer
        self.schedule = build_lr_schedule(cfg, len(self.train_loader))
        self.clip = (self.distiller.default_clip_grad_norm
                     if cfg.optim.clip_grad_norm == "auto" else cfg.optim.clip_grad_norm)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and self.device.type == "cuda")
        self._wrap_for_speed()
        self.state = TrainState()
        if mode == "resume":
            self._restore()
        else:
            self._record_start()
        return mode

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
            self.student_fwd = DistributedDataParallel(self.student, device_ids=ids)
            if any(p.requires_grad for p in self.distiller.parameters()):
                # memory banks (CRD) stay per rank: their buffers are not broadcast
                self.distiller_fwd = DistributedDataParallel(
                    self.distiller, device_ids=ids, broadcast_buffers=False)
        if self.cfg.runtime.compile:
            mode = self.cfg.runtime.compile_mode
            self.student_fwd = torch.compile(self.student_fwd, mode=mode)
            if self.teacher is not None:
                self.teacher_fwd = torch.compile(self.teacher, mode=mode)

    def _record_start(self) -> None:
        """A new run records its method and checks its teacher."""
        if self.is_main:
            self.run_dir.write_json("method.json", self.distiller.describe())
        if self.teacher is not None:
            self._check_teacher()

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes the run directory."""
        return self.dist.is_main

    def _prepare_run_dir(self) -> str:
        """Rank 0 prepares the run directory; its verdict (or error) reaches every rank."""
        if not self.dist.enabled:
            return self.run_dir.prepare(self.cfg, self.resume)
        result: tuple[str, str | None] = ("", None)
        if self.dist.is_main:
            try:
                result = (self.run_dir.prepare(self.cfg, self.resume), None)
            except KdlabError as e:
                result = ("error", str(e))
        mode, error = broadcast_object(result, self.dist)  # type: ignore[misc]
        if error is not None:
            raise RunError(error)
        return mode

    def _check_teacher(self) -> None:
        """Evaluate the teacher once and record it; stop if far below its expected accuracy."""
        assert self.teacher is not None and self.cfg.teacher is not None
        tcfg = self.cfg.teacher
        metric = self.task.best_metric
        ev = self.task.evaluate(self.teacher, self.test_loader, self.device, self.amp_dtype,
                                self.dist)
        info: dict[str, Any] = {"arch": tcfg.arch, "checkpoint": tcfg.checkpoint,
                                **_reported(ev), f"expected_{metric}": tcfg.expected_accuracy}
        if tcfg.checkpoint:
            info["sha256"] = file_sha256(tcfg.checkpoint)
        if self.is_main:
            self.run_dir.write_json("teacher.json", info)
        log.info("teacher %s: %s %.2f", tcfg.arch, metric, ev[metric])
        if tcfg.expected_accuracy is not None and (
                ev[metric] < tcfg.expected_accuracy - tcfg.accuracy_tolerance):
            raise RunError(
                f"teacher {tcfg.arch} from {tcfg.checkpoint} reaches {ev[metric]:.2f}% {metric} "
                f"on the test set, expected {tcfg.expected_accuracy:.2f}% (tolerance "
                f"{tcfg.accuracy_tolerance}); the checkpoint does not match its claimed accuracy"
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

    def _restore(self) -> None:
        found = load_latest(self.run_dir.last_checkpoint)
        if found is None:
            log.warning("no checkpoint in %s yet: starting the run from epoch 1", self.run_dir.path)
            return
        ckpt, path = found
        if ckpt.get("kind") != "kdlab-train-state":
            raise CheckpointError(f"{path} is not a kdlab training checkpoint")
        if ckpt.get("fingerprint") != self.cfg.fingerprint():
            raise CheckpointError(f"{path} belongs to a run with another config")
        load_state_dict_strict(self.student, ckpt["model"], str(path))
        self.distiller.load_state_dict(ckpt["distiller"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
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
        log.info("resumed %s from %s at epoch %d", self.run_dir.path, path.name, s.epoch)

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
        return self.distiller_fwd(out_s, out_t, batch, epoch), out_s

    def backward_step(self, terms: dict[str, Tensor], loss: Tensor) -> None:
        """Backward pass (through the optimizer's hook), optional gradient-norm clipping,
        optimizer step (no host sync)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optim.backward(terms, loss, self.scaler)
        if self.clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, self.clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state.global_step += 1

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch over the training loader; returns the epoch's training record."""
        self.student.train()
        self.distiller.train()
        self.train_loader.set_epoch(epoch)
        steps, log_every = len(self.train_loader), self.cfg.runtime.log_every
        meter = EpochMeter(self.task.train_meter(self.device), self.device)
        guard = self._guard(epoch)
        progress = self.progress if self.is_main else None
        if progress:
            progress.start_epoch(epoch, self.cfg.optim.epochs, steps)
        for i, batch in enumerate(self.train_loader, start=1):
            result = self.step(batch, epoch, t=(epoch - 1) * steps + i - 1, guard=guard)
            if not result.skipped:
                guard.observe(result.terms, result.values)
                meter.add(result.terms, result.values, result.loss, result.output, batch)
            if i % log_every == 0 or i == steps:
                guard.check(self.dist)
                if progress:
                    progress.update(i, meter.progress())
        self.state.skipped_steps = guard.total_skipped
        return meter.finish(self.dist, guard.skipped)

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
        mode = self.setup()
        if mode == "finished":
            log.info("run %s is already finished", self.run_dir.path)
            return self.run_dir.read_json("summary.json")
        if self.is_main:
            self.run_dir.set_status("running", epoch=self.state.epoch)
        t_start = time.perf_counter()
        try:
            for epoch in range(self.state.epoch + 1, self.cfg.optim.epochs + 1):
                self._run_epoch(epoch)
                if self.stop_after is not None and epoch >= self.stop_after:
                    break
        except BaseException as e:
            if self.is_main:
                self.run_dir.set_status("failed", error=f"{type(e).__name__}: {e}",
                                        epoch=self.state.epoch)
            raise
        finally:
            self._leave_process_group()
        if self.state.epoch < self.cfg.optim.epochs:
            if self.is_main:
                self.run_dir.set_status("stopped", epoch=self.state.epoch)
            log.info("stopped after epoch %d of %d; continue with --resume", self.state.epoch,
                     self.cfg.optim.epochs)
            return self._summary(time.perf_counter() - t_start)
        summary = self._summary(time.perf_counter() - t_start)
        if self.is_main:
            self.run_dir.write_json("summary.json", summary)
            self.run_dir.set_status("finished", epoch=self.state.epoch)
        return summary

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
        record.update(self.train_epoch(epoch))
        s = self.state
        metric = self.task.best_metric
        if epoch % self.cfg.runtime.eval_every == 0 or epoch == self.cfg.optim.epochs:
            t0 = time.perf_counter()
            ev = self.task.evaluate(self.student, self.test_loader, self.device, self.amp_dtype,
                                    self.dist)
            record.update({f"test_{k}": v for k, v in ev.items() if k != "count"})
            record["eval_time_s"] = time.perf_counter() - t0
            if self.task.is_better(ev[metric], s.best):
                s.best, s.best_epoch = ev[metric], epoch
                if self.is_main:
                    save_atomic(
                        {"kind": "kdlab-weights", "arch": self.cfg.student.arch,
                         "epoch": epoch, metric: ev[metric], "model": self.student.state_dict()},
                        self.run_dir.best_checkpoint, keep_previous=False)
        record[f"best_{metric}"] = s.best
        s.epoch = epoch
        if not self.is_main:
            s.history.append(record)
            return
        state = self._checkpoint_state()
        # the epoch's metrics line travels with the checkpoint: a kill between the checkpoint's
        # rename and the append below must not lose it (restored by _restore)
        state["record"] = record
        try:
            save_atomic(state, self.run_dir.last_checkpoint)
        except BaseException:
            s.epoch = epoch - 1  # status.json must name the epoch of the checkpoint on disk
            raise
        self.run_dir.append_metrics(record)
        s.history.append(record)
        if self.progress:
            self.progress.end_epoch(record)

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
            "dataset": self.cfg.data.name,
            "seed": self.cfg.seed,
            "epochs": s.epoch,
            "best_epoch": s.best_epoch,
            "train_img_per_s": sum(rates) / len(rates) if rates else math.nan,
            "wall_time_s": wall_time,
            "skipped_steps": s.skipped_steps,
        }
        for name in names or [metric]:
            summary[f"last_{name}"] = last.get(f"test_{name}", math.nan)
            summary[f"best_{name}"] = max((r[f"test_{name}"] for r in evals), default=math.nan)
        summary[f"best_{metric}"] = math.nan if s.best is None else s.best
        teacher_json = self.run_dir.path / "teacher.json"
        if teacher_json.exists():
            summary[f"teacher_{metric}"] = self.run_dir.read_json("teacher.json")[metric]
        return summary


def _reported(metrics: dict[str, float]) -> dict[str, float]:
    """The evaluation figures worth recording for a teacher (not the loss or the count)."""
    return {k: v for k, v in metrics.items() if k not in ("loss", "count")}
