"""The trainer: teacher training, student baselines and distillation, resumable at every epoch.

One training step (architecture, "keep it this short"): batch on device, augmented -> teacher
forward (eval, no grad) -> student forward -> method: named loss terms -> weighted sum ->
backward -> (clip) -> step -> metrics accumulated on the device. The host synchronises only every
``runtime.log_every`` steps (progress, non-finite check) and at the end of an epoch.
"""

from __future__ import annotations

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

from kdlab.config import STREAMED_DATASETS, ExperimentConfig, OptimConfig
from kdlab.data import DeviceLoader, ImageTensorDataset, load_dataset, subset
from kdlab.data.stream import load_stream_dataset, make_stream_loader
from kdlab.engine.checkpoint import load_latest, save_atomic
from kdlab.engine.distributed import (
    DistInfo,
    all_reduce_sum,
    broadcast_object,
    init_distributed,
    per_rank_batch,
    shutdown,
)
from kdlab.engine.evaluate import evaluate
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
from kdlab.errors import CheckpointError, ConfigError, KdlabError, NonFiniteLossError, RunError
from kdlab.methods.base import Batch, DistillContext
from kdlab.methods.compose import CompositeDistiller, build_method, method_display_name
from kdlab.models import KdModel, create_model, load_checkpoint
from kdlab.models.checkpoint import load_state_dict_strict

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class Progress(Protocol):
    """What the trainer reports to a progress display (the CLI's bar)."""

    def start_epoch(self, epoch: int, total_epochs: int, steps: int) -> None: ...

    def update(self, steps_done: int, info: dict[str, float]) -> None: ...

    def end_epoch(self, record: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """Everything that changes during training and is restored on resume."""

    epoch: int = 0
    best_top1: float = -1.0
    best_epoch: int = 0
    skipped_steps: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file (recorded for teacher checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class DataBundle:
    """The loaders of one run and what the models and methods need to know about the data."""

    train_loader: Any
    test_loader: Any
    train_labels: Tensor
    num_classes: int
    in_channels: int
    input_size: int


def load_data(cfg: ExperimentConfig) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """Train (optionally a stratified fraction) and test sets of a device-resident dataset."""
    d = cfg.data
    extra: dict[str, Any] = {}
    if d.name == "synthetic":
        extra = d.synthetic.model_dump()
    train = load_dataset(d.name, root=d.root, train=True, download=d.download, **extra)
    test = load_dataset(d.name, root=d.root, train=False, download=d.download, **extra)
    if d.train_fraction < 1.0:
        train = subset(train, d.train_fraction, seed=d.subset_seed, stratified=True)
    return train, test


def build_data(cfg: ExperimentConfig, device: torch.device, info: DistInfo | None = None
               ) -> DataBundle:
    """Loaders for ``cfg.data``: device-resident for small datasets, streamed for image files.

    Both yield ``(images, labels, index)`` on ``device``; ``set_epoch(e)`` makes epoch ``e``'s
    order and augmentation a function of ``(seed, e)`` only, so resumed runs see the same data.
    ``data.batch_size`` is the global batch: with ``info.world_size`` processes each rank gets
    its share, and the ranks' batches of one step together are the single-process batch.
    """
    d = cfg.data
    info = info or DistInfo()
    rank, world_size = info.rank, info.world_size
    batch = per_rank_batch(d.batch_size, info)
    if d.name in STREAMED_DATASETS:
        assert d.root is not None
        kw = dict(on_error=d.on_error, seed=cfg.seed, image_size=d.image_size, resize=d.resize)
        train_ds = load_stream_dataset(d.name, d.root, train=True, **kw)
        test_ds = load_stream_dataset(d.name, d.root, train=False, **kw)
        common = dict(num_workers=d.num_workers, rank=rank, world_size=world_size,
                      seed=cfg.seed, device=device)
        return DataBundle(
            train_loader=make_stream_loader(train_ds, batch, train=True, **common),
            test_loader=make_stream_loader(test_ds, d.eval_batch_size, train=False, **common),
            train_labels=torch.tensor(train_ds.index.labels, dtype=torch.long, device=device),
            num_classes=train_ds.num_classes, in_channels=3, input_size=d.image_size)
    train, test = load_data(cfg)
    common = dict(device=device, channels_last=cfg.runtime.channels_last, rank=rank,
                  world_size=world_size)
    return DataBundle(
        train_loader=DeviceLoader(train, batch_size=batch, train=True, shuffle=True,
                                  drop_last=False, padding=d.crop_padding, flip=d.hflip,
                                  seed=cfg.seed, **common),
        test_loader=DeviceLoader(test, batch_size=d.eval_batch_size, train=False, **common),
        train_labels=train.labels.to(device),
        num_classes=train.num_classes,
        in_channels=int(train.images.shape[1]),
        input_size=int(train.images.shape[-1]),
    )


def scaled_lr(optim: OptimConfig, global_batch: int) -> float:
    """The learning rate after ``optim.lr_scaling`` (an explicit rule, never implicit).

    ``none``: ``lr``; ``linear``: ``lr * global_batch / base_batch_size`` (Goyal et al., 2017);
    ``sqrt``: ``lr * sqrt(global_batch / base_batch_size)``.
    """
    ratio = global_batch / optim.base_batch_size
    if optim.lr_scaling == "linear":
        return optim.lr * ratio
    if optim.lr_scaling == "sqrt":
        return optim.lr * math.sqrt(ratio)
    return optim.lr


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
        cfg = self.cfg
        self.dist = init_distributed(cfg.runtime.device)
        mode = self._prepare_run_dir()
        if mode == "finished":
            return mode
        configure_threads(cfg.runtime.threads)
        configure_determinism(cfg.runtime.deterministic)
        seed_everything(cfg.seed)
        self.device = resolve_device(cfg.runtime.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.amp_dtype = resolve_amp(cfg.runtime.amp, self.device)
        self.memory_format = (torch.channels_last if cfg.runtime.channels_last
                              else torch.contiguous_format)

        self.data = build_data(cfg, self.device, self.dist)
        num_classes, in_channels = self.data.num_classes, self.data.in_channels
        self.input_size = self.data.input_size
        self.train_loader, self.test_loader = self.data.train_loader, self.data.test_loader

        self.student = self._make_model(cfg.student.arch, num_classes, in_channels)
        if cfg.student.checkpoint:
            load_checkpoint(self.student, cfg.student.checkpoint)
        self.teacher: KdModel | None = None
        if cfg.teacher is not None:
            self.teacher = self._make_model(cfg.teacher.arch, num_classes, in_channels)
            if cfg.teacher.checkpoint:
                load_checkpoint(self.teacher, cfg.teacher.checkpoint)
            else:
                log.warning("teacher %s has no checkpoint: it is randomly initialised "
                            "(only meaningful for speed tests)", cfg.teacher.arch)
            self.teacher.eval()
            self.teacher.requires_grad_(False)

        if len(self.train_loader) == 0:
            raise ConfigError(f"config key 'data.batch_size': {cfg.data.batch_size} is larger "
                              f"than the training set ({len(self.data.train_labels)} images)")

        ctx = DistillContext(
            student=self.student,
            teacher=self.teacher,
            student_probe=self.student.probe(self.input_size),
            teacher_probe=None if self.teacher is None else self.teacher.probe(self.input_size),
            num_classes=num_classes,
            train_labels=self.data.train_labels,
            input_size=self.input_size,
        )
        self.distiller: CompositeDistiller = build_method(cfg.method, ctx).to(self.device)

        if self.dist.enabled and cfg.runtime.sync_batchnorm:
            if self.device.type != "cuda":
                raise ConfigError("config key 'runtime.sync_batchnorm': SyncBatchNorm works "
                                  "only on GPUs in PyTorch; set it to false for CPU runs")
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
        params = [p for p in self.student.parameters()] + [
            p for p in self.distiller.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.SGD(params, lr=scaled_lr(o, cfg.data.batch_size),
                                         momentum=o.momentum,
                                         weight_decay=o.weight_decay, nesterov=o.nesterov)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=o.milestones, gamma=o.gamma)
        self.clip = (self.distiller.default_clip_grad_norm if o.clip_grad_norm == "auto"
                     else o.clip_grad_norm)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and self.device.type == "cuda")
        self.params = params

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
        if cfg.runtime.compile:
            mode = cfg.runtime.compile_mode
            self.student_fwd = torch.compile(self.student_fwd, mode=mode)
            if self.teacher is not None:
                self.teacher_fwd = torch.compile(self.teacher, mode=mode)

        self.state = TrainState()
        if mode == "resume":
            self._restore()
        else:
            if self.is_main:
                self.run_dir.write_json("method.json", self.distiller.describe())
            if self.teacher is not None:
                self._check_teacher()
        return mode

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

    def _make_model(self, arch: str, num_classes: int, in_channels: int) -> KdModel:
        model = create_model(arch, num_classes=num_classes, in_channels=in_channels)
        return model.to(self.device, memory_format=self.memory_format)

    def _check_teacher(self) -> None:
        """Evaluate the teacher once and record it; stop if far below its expected accuracy."""
        assert self.teacher is not None and self.cfg.teacher is not None
        tcfg = self.cfg.teacher
        acc = evaluate(self.teacher, self.test_loader, self.device, self.amp_dtype, self.dist)
        info: dict[str, Any] = {"arch": tcfg.arch, "checkpoint": tcfg.checkpoint,
                                "top1": acc["top1"], "top5": acc["top5"],
                                "expected_top1": tcfg.expected_accuracy}
        if tcfg.checkpoint:
            info["sha256"] = file_sha256(tcfg.checkpoint)
        if self.is_main:
            self.run_dir.write_json("teacher.json", info)
        log.info("teacher %s: top-1 %.2f%%", tcfg.arch, acc["top1"])
        if tcfg.expected_accuracy is not None and (
                acc["top1"] < tcfg.expected_accuracy - tcfg.accuracy_tolerance):
            raise RunError(
                f"teacher {tcfg.arch} from {tcfg.checkpoint} reaches {acc['top1']:.2f}% top-1 "
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
            "arch": self.cfg.student.arch,
            "num_classes": self.data.num_classes,
            "in_channels": self.data.in_channels,
            "epoch": s.epoch,
            "global_step": s.global_step,
            "best_top1": s.best_top1,
            "best_epoch": s.best_epoch,
            "skipped_steps": s.skipped_steps,
            "model": self.student.state_dict(),
            "distiller": self.distiller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
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
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        s = self.state
        s.epoch, s.global_step = int(ckpt["epoch"]), int(ckpt["global_step"])
        s.best_top1, s.best_epoch = float(ckpt["best_top1"]), int(ckpt["best_epoch"])
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
    def forward_terms(self, images: Tensor, labels: Tensor, index: Tensor, epoch: int
                      ) -> tuple[dict[str, Tensor], Tensor]:
        """Teacher and student forward, then the method's named, weighted loss terms."""
        with autocast(self.device, self.amp_dtype):
            out_t = None
            if self.teacher_fwd is not None and self.distiller.uses_teacher:
                with torch.no_grad():
                    out_t = self.teacher_fwd(images)
            out_s = self.student_fwd(images)
        terms = self.distiller_fwd(out_s, out_t, Batch(images, labels, index), epoch)
        return terms, out_s.logits

    def backward_step(self, loss: Tensor) -> None:
        """Backward pass, optional gradient-norm clipping, optimizer step (no host sync)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state.global_step += 1

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch over the training loader; returns the epoch's training metrics."""
        rt = self.cfg.runtime
        self.student.train()
        self.distiller.train()
        self.train_loader.set_epoch(epoch)
        steps = len(self.train_loader)
        dev = self.device
        term_names: list[str] = []
        term_sums: Tensor | None = None
        first_bad: Tensor | None = None
        correct = torch.zeros((), dtype=torch.long, device=dev)
        step_t = torch.zeros((), dtype=torch.long, device=dev)
        seen = 0
        skipped = 0
        t0 = time.perf_counter()
        progress = self.progress if self.is_main else None
        if progress:
            progress.start_epoch(epoch, self.cfg.optim.epochs, steps)
        for step, (images, labels, index) in enumerate(self.train_loader, start=1):
            terms, logits = self.forward_terms(images, labels, index, epoch)
            values = torch.stack([v.float() for v in terms.values()])
            if term_sums is None:
                term_names = list(terms)
                term_sums = torch.zeros(len(term_names), dtype=torch.float64, device=dev)
                first_bad = torch.full((len(term_names),), -1, dtype=torch.long, device=dev)
            assert first_bad is not None
            loss = values.sum()
            finite = torch.isfinite(values)
            if rt.non_finite == "skip" and not bool(finite.all()):
                skipped += 1
                self.state.skipped_steps += 1
                if self.state.skipped_steps > rt.max_skipped_steps:
                    self._raise_non_finite(epoch, step, term_names, finite)
                self.optimizer.zero_grad(set_to_none=True)
                continue
            step_t += 1
            first_bad = torch.where((first_bad < 0) & ~finite, step_t, first_bad)
            self.backward_step(loss)
            term_sums += values.detach().double()
            correct += logits.detach().argmax(dim=1).eq(labels).sum()
            seen += labels.shape[0]
            if step % rt.log_every == 0 or step == steps:
                bad_any = all_reduce_sum((first_bad >= 0).any().long(), self.dist)
                if bool(bad_any):
                    self._raise_non_finite(epoch, None, term_names, first_bad < 0, first_bad)
                if progress:
                    done = max(step - skipped, 1)
                    elapsed = time.perf_counter() - t0
                    progress.update(step, {
                        "loss": float(term_sums.sum()) / done,
                        "acc": 100.0 * float(correct) / max(seen, 1),
                        "img_s": seen / max(elapsed, 1e-9),
                    })
        elapsed = time.perf_counter() - t0
        done = max(steps - skipped, 1)
        if self.dist.enabled and term_sums is not None:
            # per-rank sums of batch means -> mean over ranks; counts -> global counts
            all_reduce_sum(term_sums, self.dist).div_(self.dist.world_size)
            counts = all_reduce_sum(torch.stack([correct, torch.tensor(seen, device=dev)]),
                                    self.dist)
            correct, seen = counts[0], int(counts[1])
        sums = term_sums.tolist() if term_sums is not None else []
        record = {
            "train_loss": sum(sums) / done,
            "train_terms": {n: v / done for n, v in zip(term_names, sums, strict=True)},
            "train_top1": 100.0 * float(correct) / max(seen, 1),
            "train_img_per_s": seen / max(elapsed, 1e-9),
            "train_time_s": elapsed,
            "skipped_steps": skipped,
        }
        return record

    def _raise_non_finite(self, epoch: int, step: int | None, names: list[str], finite: Tensor,
                          first_bad: Tensor | None = None) -> None:
        bad = [n for n, ok in zip(names, finite.tolist(), strict=True) if not ok]
        if step is None and first_bad is not None:
            step = int(first_bad[first_bad >= 0].min())
            # name the term(s) that broke first, not those poisoned by the NaN weights after it
            bad = [n for n, s in zip(names, first_bad.tolist(), strict=True) if s == step]
        last = self.state.epoch
        kept = (f"the last good checkpoint (epoch {last}) is kept in "
                f"{self.run_dir.last_checkpoint.parent}" if last > 0
                else "no checkpoint was written yet")
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch}, step {step} in term(s) {', '.join(bad)}; {kept}; "
            "lower the learning rate or set runtime.non_finite=skip"
        )

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
            shutdown(self.dist)
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

    def _run_epoch(self, epoch: int) -> None:
        record: dict[str, Any] = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
        record.update(self.train_epoch(epoch))
        self.scheduler.step()
        s = self.state
        if epoch % self.cfg.runtime.eval_every == 0 or epoch == self.cfg.optim.epochs:
            t0 = time.perf_counter()
            ev = evaluate(self.student, self.test_loader, self.device, self.amp_dtype, self.dist)
            record.update({"test_top1": ev["top1"], "test_top5": ev["top5"],
                           "test_loss": ev["loss"], "eval_time_s": time.perf_counter() - t0})
            if ev["top1"] > s.best_top1:
                s.best_top1, s.best_epoch = ev["top1"], epoch
                if self.is_main:
                    save_atomic(
                        {"kind": "kdlab-weights", "arch": self.cfg.student.arch,
                         "epoch": epoch, "top1": ev["top1"], "model": self.student.state_dict()},
                        self.run_dir.best_checkpoint, keep_previous=False)
        record["best_top1"] = s.best_top1
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
        evals = [r for r in s.history if "test_top1" in r]
        last = evals[-1] if evals else {}
        rates = [r["train_img_per_s"] for r in s.history if "train_img_per_s" in r]
        summary: dict[str, Any] = {
            "name": self.cfg.name,
            "method": method_display_name(self.cfg.method) if self.teacher else "vanilla",
            "student": self.cfg.student.arch,
            "teacher": None if self.cfg.teacher is None else self.cfg.teacher.arch,
            "dataset": self.cfg.data.name,
            "seed": self.cfg.seed,
            "epochs": s.epoch,
            "best_top1": s.best_top1,
            "best_epoch": s.best_epoch,
            "last_top1": last.get("test_top1", math.nan),
            "last_top5": last.get("test_top5", math.nan),
            "best_top5": max((r["test_top5"] for r in evals), default=math.nan),
            "train_img_per_s": sum(rates) / len(rates) if rates else math.nan,
            "wall_time_s": wall_time,
            "skipped_steps": s.skipped_steps,
        }
        teacher_json = self.run_dir.path / "teacher.json"
        if teacher_json.exists():
            summary["teacher_top1"] = self.run_dir.read_json("teacher.json")["top1"]
        return summary
