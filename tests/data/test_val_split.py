"""The held-out validation split (``data.val_fraction``) and the trainer's use of it.

The split: stratified with exact per-class counts, disjoint from and together with the training
part covering the training split, a pure function of ``(labels, val_fraction, subset_seed)``,
independent of ``train_fraction``, served with the evaluation transform (resident and streamed
datasets), rank-aware. The trainer: the best epoch is chosen on validation (in a run where
validation and test disagree), the summary says so, resume is exact, and ``val_fraction: 0``
changes nothing.
"""

from __future__ import annotations

import copy
import json
import signal
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kdlab.config import ExperimentConfig, dict_fingerprint, validate_config
from kdlab.core.errors import ConfigError, KdlabError, RunInterrupted
from kdlab.data import load_dataset, subset
from kdlab.data.build import build_data, load_resident_data, load_resident_splits
from kdlab.data.split import split_indices, val_counts
from kdlab.data.stream import read_image
from kdlab.data.transforms import imagenet_eval_transform
from kdlab.engine.trainer import Trainer
from kdlab.tasks.classification.task import ClassificationTask

CPU = torch.device("cpu")


def _expected_counts(counts: list[int], fraction: float) -> list[int]:
    """Independent statement of the rule: round half up of fraction * n_c (the fraction as the
    decimal it is written as, exact rational arithmetic), never a class's last image."""
    out = []
    for n in counts:
        k = int(Fraction(str(fraction)) * n + Fraction(1, 2))  # floor for non-negative values
        out.append(max(0, min(k, n - 1)))
    return out


def _labels(counts: list[int], seed: int = 3) -> np.ndarray:
    lab = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in enumerate(counts)])
    return np.random.default_rng(seed).permutation(lab)


# --------------------------------------------------------------------------- the split itself
@pytest.mark.parametrize("fraction", [0.1, 0.15, 0.25, 0.3, 0.35, 0.5])
def test_stratification_is_exact_per_class(fraction: float) -> None:
    counts = [7, 10, 3, 1, 0, 25, 2, 30]
    lab = _labels(counts)
    train, val = split_indices(lab, len(counts), fraction, seed=0)
    got = np.bincount(lab[val], minlength=len(counts)).tolist()
    assert got == _expected_counts(counts, fraction)
    assert val_counts(lab, len(counts), fraction).tolist() == got
    # every class that had images keeps at least one for training
    kept = np.bincount(lab[train], minlength=len(counts))
    assert all(kept[c] >= 1 for c, n in enumerate(counts) if n > 0)
    # each class's share is the fraction, up to the rounding of one image
    for c, n in enumerate(counts):
        if n > 1:
            assert abs(got[c] - fraction * n) <= 0.5 + 1e-9


def test_disjoint_and_covering_and_sorted() -> None:
    lab = _labels([40, 33, 27, 50])
    train, val = split_indices(lab, 4, 0.2, seed=5)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(lab.size))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    assert train.dtype == val.dtype == np.int64


def test_deterministic_in_the_seed() -> None:
    lab = _labels([40, 33, 27, 50])
    a = split_indices(lab, 4, 0.2, seed=1)[1]
    assert np.array_equal(a, split_indices(lab.copy(), 4, 0.2, seed=1)[1])
    b = split_indices(lab, 4, 0.2, seed=2)[1]
    assert not np.array_equal(a, b)
    # same per-class counts for every seed
    assert np.array_equal(np.bincount(lab[a]), np.bincount(lab[b]))


def test_zero_fraction_and_errors() -> None:
    lab = _labels([4, 4])
    train, val = split_indices(lab, 2, 0.0, seed=0)
    assert np.array_equal(train, np.arange(8)) and val.size == 0
    with pytest.raises(ConfigError, match="leaves no validation image"):
        split_indices(np.array([0, 1, 1]), 2, 0.1, seed=0)  # rounds to 0 images per class
    with pytest.raises(ConfigError, match="outside"):
        val_counts(lab, 2, 0.6)
    base = {"data": {"name": "synthetic"}, "student": {"arch": "resnet8"}}
    for bad in (-0.1, 0.51):
        bad_cfg = copy.deepcopy(base)
        bad_cfg["data"]["val_fraction"] = bad
        with pytest.raises(KdlabError, match="val_fraction"):
            validate_config(bad_cfg)


def test_fingerprint_unchanged_at_zero() -> None:
    base = {"data": {"name": "synthetic"}, "student": {"arch": "resnet8"}}
    d = validate_config(base).to_dict()
    assert d["data"]["val_fraction"] == 0.0
    old = copy.deepcopy(d)
    del old["data"]["val_fraction"]  # a config written before the key existed
    assert dict_fingerprint(d) == dict_fingerprint(old)
    with_val = copy.deepcopy(d)
    with_val["data"]["val_fraction"] = 0.1
    assert dict_fingerprint(with_val) != dict_fingerprint(d)


# --------------------------------------------------------------------------- resident datasets
SYN = {"n_train": 240, "n_test": 40, "num_classes": 6, "size": 8, "channels": 3}


def _data_cfg(**kw: Any) -> Any:
    cfg = {"data": {"name": "synthetic", "synthetic": SYN, "batch_size": 16,
                    "eval_batch_size": 32, **kw}, "student": {"arch": "resnet8"}}
    return validate_config(cfg).data


def _source(ds: Any) -> np.ndarray:
    return ds.source_indices.cpu().numpy()


def test_val_independent_of_train_fraction_and_disjoint_from_train() -> None:
    full = load_dataset("synthetic", train=True, **SYN)
    vals = []
    for tf in (1.0, 0.5, 0.2):
        train, val, test = load_resident_data(_data_cfg(val_fraction=0.25, train_fraction=tf,
                                                        subset_seed=4))
        assert val is not None
        vals.append(_source(val))
        assert np.intersect1d(_source(train), _source(val)).size == 0
        # the indices point at the right images
        assert torch.equal(val.images, full.images[torch.from_numpy(_source(val))])
        assert torch.equal(train.labels, full.labels[torch.from_numpy(_source(train))])
        assert len(test) == SYN["n_test"]
        # train_fraction takes its share of what validation left: 180 images
        assert len(train) == round(tf * 180)
    assert all(np.array_equal(vals[0], v) for v in vals[1:])
    counts = np.bincount(full.labels.numpy(), minlength=6).tolist()
    assert np.bincount(full.labels.numpy()[vals[0]], minlength=6).tolist() == \
        _expected_counts(counts, 0.25)
    # the seed of the split is data.subset_seed: another one gives another validation set
    other = load_resident_data(_data_cfg(val_fraction=0.25, subset_seed=5))[1]
    assert other is not None and not np.array_equal(_source(other), vals[0])


def test_zero_fraction_is_the_previous_subset() -> None:
    cfg = _data_cfg(train_fraction=0.5, subset_seed=2)
    train, val, _ = load_resident_data(cfg)
    assert val is None
    before = subset(load_dataset("synthetic", train=True, **SYN), 0.5, seed=2, stratified=True)
    assert torch.equal(train.images, before.images) and torch.equal(train.labels, before.labels)
    assert torch.equal(train.source_indices, before.source_indices)
    assert torch.equal(load_resident_splits(cfg)[0].images, before.images)
    assert build_data(cfg, seed=0, device=CPU).val_loader is None


def test_val_loader_uses_the_evaluation_transform() -> None:
    cfg = _data_cfg(val_fraction=0.2, crop_padding=4, hflip=True)
    bundle = build_data(cfg, seed=0, device=CPU, channels_last=False)
    _, val, _ = load_resident_data(cfg)
    assert val is not None and bundle.val_loader is not None
    assert bundle.val_loader.augment is False and bundle.val_loader.shuffle is False
    mean = torch.tensor(val.mean).view(1, -1, 1, 1)
    std = torch.tensor(val.std).view(1, -1, 1, 1)
    expected = (val.images.float() / 255.0 - mean) / std  # the un-augmented images, in order
    for epoch in (1, 2):
        bundle.val_loader.set_epoch(epoch)
        got = torch.cat([b.images for b in bundle.val_loader])
        labels = torch.cat([b.labels for b in bundle.val_loader])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert torch.equal(labels, val.labels)
    # training batches are augmented (the same images would differ somewhere)
    assert bundle.train_loader.augment is True
    assert bundle.train_size == 240 - len(val)
    assert bundle.train_labels.shape[0] == len(bundle.train_loader.dataset)


def test_val_loader_is_sharded_over_ranks() -> None:
    cfg = _data_cfg(val_fraction=0.2)
    seen = []
    for rank in (0, 1):
        loader = build_data(cfg, seed=0, device=CPU, rank=rank, world_size=2).val_loader
        seen.append(torch.cat([b.index for b in loader]))
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(48))  # 20% of 240
    assert abs(len(seen[0]) - len(seen[1])) <= 1


# --------------------------------------------------------------------------- streamed datasets
def _folder(root: Path, per_class: int = 6, classes: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for k in range(n):
                arr = rng.integers(0, 256, (24, 28, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{k}.png")
    return root


def test_streamed_split_and_eval_transform(tmp_path: Path) -> None:
    root = _folder(tmp_path / "folder")
    cfg = validate_config({"data": {"name": "folder", "root": str(root), "num_workers": 0,
                                    "image_size": 16, "resize": 20, "val_fraction": 0.34,
                                    "batch_size": 4, "eval_batch_size": 4},
                           "student": {"arch": "resnet8"}}).data
    bundle = build_data(cfg, seed=0, device=CPU)
    val_index = bundle.val_loader.dataset.index
    train_index = bundle.train_loader.dataset.index
    assert np.bincount(val_index.labels).tolist() == _expected_counts([6, 6, 6], 0.34)  # 2 each
    assert sorted(val_index.paths + train_index.paths) == sorted(
        str(p) for p in (root / "train").rglob("*.png"))
    assert not set(val_index.paths) & set(train_index.paths)
    assert bundle.train_labels.tolist() == train_index.labels
    # the same split for another run seed (a function of data.subset_seed only)
    again = build_data(cfg, seed=7, device=CPU).val_loader.dataset.index
    assert again.paths == val_index.paths
    # evaluation transform: resize + center crop, no randomness
    transform = imagenet_eval_transform(20, 16, normalize=False)
    mean = torch.tensor(bundle.val_loader.dataset.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.val_loader.dataset.std).view(1, -1, 1, 1)
    for epoch in (1, 2):
        bundle.val_loader.set_epoch(epoch)
        batches = list(bundle.val_loader)
        images = torch.cat([b.images for b in batches])
        index = torch.cat([b.index for b in batches]).tolist()
        assert index == list(range(len(val_index)))
        raw = torch.stack([transform(read_image(val_index.paths[i]), np.random.default_rng(0))
                           for i in index])
        torch.testing.assert_close(images, (raw.float() / 255.0 - mean) / std, atol=1e-5,
                                   rtol=0)


# --------------------------------------------------------------------------- the trainer
TRAIN_CFG: dict[str, Any] = {
    "name": "val",
    "data": {"name": "synthetic", "batch_size": 16, "eval_batch_size": 64,
             "val_fraction": 0.2, "train_fraction": 0.5,
             "synthetic": {"n_train": 160, "n_test": 32, "num_classes": 4, "size": 16}},
    "student": {"arch": "resnet8"},
    "optim": {"epochs": 4, "milestones": [3], "lr": 0.05},
    "runtime": {"threads": 1, "amp": "off", "deterministic": True},
}


def _cfg(**data: Any) -> ExperimentConfig:
    d = copy.deepcopy(TRAIN_CFG)
    d["data"].update(data)
    return validate_config(d)


def _metrics(run: Path) -> list[dict[str, Any]]:
    strip = ("train_img_per_s", "train_time_s", "eval_time_s")
    return [{k: v for k, v in json.loads(x).items() if k not in strip}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


VAL_CURVE = {1: 10.0, 2: 30.0, 3: 20.0, 4: 25.0}
TEST_CURVE = {1: 40.0, 2: 15.0, 3: 35.0, 4: 50.0}


@pytest.mark.e2e
def test_best_epoch_is_chosen_on_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    """Validation and test disagree by construction: validation peaks at epoch 2, test at 4.
    The best epoch, best.pt and the summary follow validation; the test set is only scored."""
    trainer = Trainer(_cfg(), tmp_path / "run")
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    calls: list[tuple[str, int]] = []

    def scripted(self: Any, model: Any, batches: Any, device: Any, amp: Any, dist: Any = None
                 ) -> dict[str, float]:
        epoch = trainer.state.epoch + 1
        which = "val" if batches is trainer.val_loader else "test"
        assert batches is (trainer.val_loader if which == "val" else trainer.test_loader)
        assert dist is trainer.dist  # rank-aware like the test evaluation
        calls.append((which, epoch))
        if which == "val":
            snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        v = (VAL_CURVE if which == "val" else TEST_CURVE)[epoch]
        return {"top1": v, "top5": v + 1.0, "loss": 1.0, "count": 1}

    monkeypatch.setattr(ClassificationTask, "evaluate", scripted)
    summary = trainer.run()
    assert calls == [(w, e) for e in range(1, 5) for w in ("test", "val")]
    assert summary["best_epoch"] == 2
    assert summary["best_val_top1"] == 30.0 and summary["test_top1_at_best"] == 15.0
    assert summary["test_top5_at_best"] == 16.0
    assert summary["best_top1"] == 50.0  # best on test, the old meaning
    assert summary["last_top1"] == 50.0 and summary["last_val_top1"] == 25.0
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == 2 and best["top1"] == 15.0 and best["val_top1"] == 30.0
    for k, v in snapshots[2].items():
        assert torch.equal(best["model"][k], v), k
    assert any(not torch.equal(snapshots[2][k], snapshots[4][k]) for k in snapshots[2])
    records = _metrics(tmp_path / "run")
    assert [r["val_top1"] for r in records] == [VAL_CURVE[e] for e in range(1, 5)]
    assert [r["best_val_top1"] for r in records] == [10.0, 30.0, 30.0, 30.0]
    assert [r["best_top1"] for r in records] == [40.0, 40.0, 40.0, 50.0]
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == pytest.approx(
        summary, nan_ok=True)


class _StopMidEpoch(Trainer):
    """Asks to stop (as SIGTERM would) at one global step: a step checkpoint is written."""

    stop_at = 7

    def step(self, batch: Any, epoch: int, **kw: Any) -> Any:
        out = super().step(batch, epoch, **kw)
        if self.state.global_step == self.stop_at:
            self._stop_signal = signal.SIGTERM
        return out


@pytest.mark.e2e
def test_real_run_summary_and_exact_resume(tmp_path: Path) -> None:
    """A real run with validation: the summary agrees with metrics.jsonl, and a run stopped
    after an epoch, or in the middle of one, resumes to the same numbers and weights."""
    cfg = _cfg()
    full = Trainer(cfg, tmp_path / "full").run()
    records = _metrics(tmp_path / "full")
    vals = [r["val_top1"] for r in records]
    best_epoch = 1 + int(np.argmax(vals))  # first maximum: later ties do not replace it
    assert full["best_epoch"] == best_epoch and full["best_val_top1"] == max(vals)
    assert full["test_top1_at_best"] == records[best_epoch - 1]["test_top1"]
    assert full["best_top1"] == max(r["test_top1"] for r in records)
    assert full["last_top1"] == records[-1]["test_top1"]
    assert all({"val_top1", "val_top5", "val_loss", "test_top1"} <= r.keys() for r in records)

    Trainer(cfg, tmp_path / "epoch", stop_after=1).run()
    Trainer(cfg, tmp_path / "epoch", resume="required").run()
    cfg_steps = _cfg()
    cfg_steps.runtime.checkpoint_every_steps = 3
    with pytest.raises(RunInterrupted):
        _StopMidEpoch(cfg_steps, tmp_path / "mid").run()
    assert (tmp_path / "mid" / "checkpoints" / "step.pt").exists()
    Trainer(cfg, tmp_path / "mid", resume="required").run()
    ref = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    for name in ("epoch", "mid"):
        assert _metrics(tmp_path / name) == records, name
        got = torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)
        for k, v in ref["model"].items():
            assert torch.equal(got["model"][k], v), (name, k)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        for key in ("best_epoch", "best_val_top1", "test_top1_at_best", "best_top1",
                    "last_top1"):
            assert summary[key] == full[key], (name, key)


@pytest.mark.e2e
def test_zero_fraction_summary_has_the_old_keys_only(tmp_path: Path) -> None:
    cfg = _cfg(val_fraction=0.0)
    cfg.optim.epochs = 2
    summary = Trainer(cfg, tmp_path / "run").run()
    records = _metrics(tmp_path / "run")
    assert not any(k.startswith("val_") or "_val_" in k or k.endswith("_at_best")
                   for k in summary)
    assert not any(k.startswith("val_") or "_val_" in k for r in records for k in r)
    tests = [r["test_top1"] for r in records]
    assert summary["best_top1"] == max(tests)
    assert summary["best_epoch"] == 1 + int(np.argmax(tests))
    assert [r["best_top1"] for r in records] == [max(tests[: i + 1]) for i in range(2)]
