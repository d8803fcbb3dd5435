"""The classic CIFAR distillation pipeline of published toolkits (RepDistiller, mdistiller).

Reference for ``benchmarks/compare.py``: the same kdlab models and the same kdlab loss functions
(the registered distiller), only the pipeline differs:

* a map-style ``Dataset`` over ``uint8`` HWC numpy images, transformed PER SAMPLE in Python:
  random crop 32 with 4-pixel zero padding, random horizontal flip (p = 1/2), to-tensor
  (HWC uint8 -> CHW float in [0, 1]), normalise, as ``torchvision.transforms`` would
  (torchvision is not installed: numpy/torch ops, one sample at a time; the toolkits also
  round-trip every sample through a PIL image, which this version skips, so it is if anything
  faster than the original);
* ``DataLoader(shuffle=True, num_workers=2)``: mdistiller's CIFAR default ``num_workers`` is 2,
  and this machine has 2 cores. Workers are persistent and the iterator is kept across rounds,
  so worker start-up is excluded from the timings (the toolkits restart workers every epoch);
* fp32, NCHW (contiguous) models, teacher in eval mode under ``no_grad``;
* ``loss.item()`` and a top-1 ``.item()`` every step (the toolkits' ``AverageMeter`` updates:
  one host sync per step); ``zero_grad`` / ``backward`` / gradient clip where the method's
  published trainer clips (SDD: 40) / ``SGD.step``.

    .venv/bin/python benchmarks/classic_pipeline.py --steps 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdlab.config import MethodConfig
from kdlab.data.synthetic import SYNTHETIC_MEAN, SYNTHETIC_STD, make_synthetic_arrays
from kdlab.methods.base import Batch, DistillContext
from kdlab.methods.compose import build_method
from kdlab.models import create_model


class ClassicCIFARDataset(Dataset):
    """Per-sample crop (zero padding) + flip + to-tensor + normalise over HWC uint8 images.

    Returns ``(image, label, index)`` like RepDistiller's ``CIFAR100Instance``.
    """

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, mean: tuple[float, ...],
                 std: tuple[float, ...], padding: int = 4, train: bool = True) -> None:
        self.images = images_hwc
        self.labels = labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.padding = padding
        self.train = train

    def __len__(self) -> int:
        return len(self.labels)

    def _random_crop(self, img: np.ndarray) -> np.ndarray:
        """``transforms.RandomCrop(size, padding=p)``: zero-pad, then one random window."""
        h, w = img.shape[:2]
        p = self.padding
        padded = np.pad(img, ((p, p), (p, p), (0, 0)), mode="constant")
        i = int(torch.randint(0, 2 * p + 1, (1,)).item())
        j = int(torch.randint(0, 2 * p + 1, (1,)).item())
        return padded[i:i + h, j:j + w]

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        img = self.images[index]
        if self.train:
            img = self._random_crop(img)
            if torch.rand(1).item() < 0.5:  # transforms.RandomHorizontalFlip()
                img = img[:, ::-1]
        # transforms.ToTensor(): HWC uint8 -> CHW float32 / 255
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()
        x = x.float().div(255.0)
        x = (x - self.mean) / self.std  # transforms.Normalize(mean, std)
        return x, int(self.labels[index]), index


class ClassicPipeline:
    """A teacher/student pair trained the classic way; :meth:`run` times ``steps`` steps."""

    def __init__(self, teacher: str = "resnet32x4", student: str = "resnet8x4",
                 method: str = "sd_dkd", params: dict[str, Any] | None = None,
                 batch_size: int = 64, input_size: int = 32, num_classes: int = 100,
                 n_train: int | None = None, num_workers: int = 2, device: str = "cpu",
                 lr: float = 0.05, seed: int = 0) -> None:
        self.device = torch.device(device)
        n = n_train or batch_size * 16
        images, labels = make_synthetic_arrays(n, num_classes, 3, input_size, seed, "train")
        ds = ClassicCIFARDataset(np.ascontiguousarray(images.transpose(0, 2, 3, 1)), labels,
                                 (SYNTHETIC_MEAN,) * 3, (SYNTHETIC_STD,) * 3)
        self.loader = DataLoader(ds, batch_size=batch_size, shuffle=True,
                                 num_workers=num_workers, pin_memory=self.device.type == "cuda",
                                 persistent_workers=num_workers > 0)
        torch.manual_seed(seed)
        self.teacher = create_model(teacher, num_classes=num_classes).to(self.device).eval()
        self.student = create_model(student, num_classes=num_classes).to(self.device).train()
        ctx = DistillContext.from_models(
            self.student, self.teacher, num_classes=num_classes,
            train_labels=torch.from_numpy(labels).to(self.device), input_size=input_size)
        self.distiller = build_method(MethodConfig(name=method, params=params or {}),
                                      ctx).to(self.device)
        self.params = list(self.student.parameters()) + [
            p for p in self.distiller.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=0.9, weight_decay=5e-4)
        self.clip = self.distiller.default_clip_grad_norm
        self.epoch = 1
        self._it: Iterator[Any] | None = None
        self.last_loss = float("nan")

    def _next(self) -> Any:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = iter(self.loader)
            return next(self._it)

    def step(self) -> float:
        """One training step; returns the loss (``loss.item()``, a host sync)."""
        images, labels, index = self._next()
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        index = index.to(self.device, non_blocking=True)
        with torch.no_grad():
            out_t = self.teacher(images)
        out_s = self.student(images)
        terms = self.distiller(out_s, out_t, Batch(images, labels, index), self.epoch)
        loss = sum(terms.values())
        self.optimizer.zero_grad()
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        acc = (out_s.logits.argmax(1) == labels).float().mean().item()  # AverageMeter update
        self.last_loss = float(loss.item())
        del acc
        return self.last_loss

    def run(self, steps: int) -> float:
        """Seconds for ``steps`` training steps (each ends with a host sync)."""
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description="time the classic pipeline alone")
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--method", default="sd_dkd")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = ClassicPipeline(args.teacher, args.student, args.method,
                           batch_size=args.batch_size, num_workers=args.workers)
    pipe.run(args.warmup)
    dt = pipe.run(args.steps)
    print(f"classic: {1e3 * dt / args.steps:.1f} ms/step, "
          f"{args.batch_size * args.steps / dt:.1f} img/s (loss {pipe.last_loss:.4f})")


if __name__ == "__main__":
    main()
