"""``kdlab export RUN --format onnx --include-preprocessing``: pixels in, predictions out.

The graph takes the ``uint8`` images a decoder gives after the resize and centre crop of the
run's input description (``N x C x h x w``, ``h = w = InputSpec.uint8_size``, e.g. 28 for
Fashion-MNIST, 224 for ImageNet) and does the rest inside: the zero padding, the cast to float
and the normalisation with the test loader's own arithmetic, the student, and (with
``--probabilities``) the softmax. The resize and crop stay outside because they depend on each
image's size; the recipe is in the file's ``kdlab`` metadata (``input_spec``).

Parity: the artefact and the eager student (fed :meth:`InputSpec.normalize` of the same
pixels, i.e. the tensor the test loader makes) are run on the run's whole test set, as ``uint8``
before the normalisation; the bounds are those of :mod:`kdlab.deploy.export`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.export import Dim

from kdlab.core.io import atomic_write
from kdlab.data.input_spec import InputSpec
from kdlab.deploy.export import (
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_TOLERANCE,
    INPUT_NAME,
    ExportError,
    ExportResult,
    LogitsOnly,
    ParityError,
    _parity_failures,
    _require,
    _write_via_tmp,
    check_parity,
    deployable,
    load_artefact,
    load_run,
    parity_path,
    set_onnx_metadata,
    versions,
)

log = logging.getLogger(__name__)

__all__ = ["WithPreprocessing", "export_with_preprocessing", "uint8_test_batches"]

PROBABILITIES_NAME = "probabilities"
LOGITS_NAME = "logits"


class WithPreprocessing(nn.Module):
    """``uint8 N x C x h x w -> logits`` (or probabilities): ``spec``'s padding and
    normalisation (same operation order as :meth:`InputSpec.normalize`), then ``model``'s
    logits, then a softmax over classes when ``probabilities``."""

    def __init__(self, model: nn.Module, spec: InputSpec, probabilities: bool = False) -> None:
        super().__init__()
        if spec.normalization == "unit" or spec.mean is None or spec.std is None:
            raise ExportError("--include-preprocessing handles classification inputs "
                              "(normalised with mean/std)")
        self.model = LogitsOnly(deployable(model))
        self.pad = int(spec.pad)
        self.scale_first = spec.normalization == "scale_then_shift"
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        if self.scale_first:
            self.register_buffer("shift", mean)
            self.register_buffer("scale", 1.0 / std)
        else:
            self.register_buffer("shift", mean * 255.0)
            self.register_buffer("scale", 1.0 / (std * 255.0))
        self.probabilities = probabilities

    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        if self.pad:
            x = F.pad(x, (self.pad, self.pad, self.pad, self.pad))
        if self.scale_first:
            x = x * (1.0 / 255.0)
        x = (x - self.shift) * self.scale
        logits = self.model(x)
        return logits.softmax(1) if self.probabilities else logits


def uint8_test_batches(data: Any, spec: InputSpec) -> Iterator[tuple[Tensor, Tensor]]:
    """The run's test images as ``(uint8 N x C x h x w, labels)`` batches before padding and
    normalisation: the resident tensors with the padding cut off, or the stream loader's
    decoded, resized and cropped images before its normalisation."""
    loader = data.test_loader
    ds = loader.dataset
    p = int(spec.pad)
    if hasattr(ds, "images"):
        images = ds.images[..., p:ds.images.shape[-2] - p, p:ds.images.shape[-1] - p]
        step = int(getattr(loader, "batch_size", 256))
        for i in range(0, images.shape[0], step):
            yield images[i:i + step].cpu(), ds.labels[i:i + step].cpu()
        return
    loader.set_epoch(0)
    for batch in loader.loader:  # the DataLoader under the stream loader: uint8, not normalised
        yield batch[0], batch[1]


def _metadata(meta: dict[str, Any], spec: InputSpec, probabilities: bool) -> dict[str, Any]:
    out = PROBABILITIES_NAME if probabilities else LOGITS_NAME
    side = spec.uint8_size
    return {**meta, "precision": "fp32", "preprocessing_inside": True,
            "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "uint8",
                      "shape": ["batch", spec.channels, side, side],
                      "meaning": "pixels after the resize and centre crop of input_spec; the "
                                 "padding and normalisation happen inside the graph"},
            "output": {"name": out, "meaning": f"class {out} (B x num_classes)"}}


def _save(module: WithPreprocessing, path: Path, example: Tensor, output: str,
          metadata: dict[str, Any]) -> None:
    """ONNX (dynamo exporter, dynamic batch) of ``module``, with ``metadata`` attached."""
    _require("onnx", "onnxscript", what="ONNX export")
    try:
        program = torch.onnx.export(module.eval(), (example,), dynamo=True,
                                    input_names=[INPUT_NAME], output_names=[output],
                                    dynamic_shapes={INPUT_NAME: {0: Dim("batch", min=1)}},
                                    verbose=False)
    except Exception as e:  # the exporter raises many types
        raise ExportError(f"ONNX export with preprocessing failed: {str(e).splitlines()[0]}"
                          ) from e
    _write_via_tmp(path, lambda p: program.save(str(p)))
    set_onnx_metadata(path, metadata)


def export_with_preprocessing(run_dir: str | Path, out: str | Path | None = None, *,
                              probabilities: bool = False, tolerance: float | None = None,
                              min_agreement: float | None = None,
                              overrides: Sequence[str] = (), plugins: Sequence[str] = (),
                              checkpoint: str | Path | None = None) -> ExportResult:
    """Write ``student.pre.onnx`` (see the module docstring), check it against the eager
    student on the uint8 test images, write ``FILE.parity.json``.

    Raises :class:`ExportError` before writing (no input description, detection run, missing
    onnx), :class:`ParityError` after writing when the check fails."""
    _require("onnxruntime", what="the ONNX parity check")
    run = load_run(run_dir, overrides, plugins, checkpoint)
    spec = run.input_spec
    if spec is None:
        raise ExportError(f"run {run_dir} records no input description; "
                          "--include-preprocessing needs one")
    path = Path(out) if out else run.run_dir / "export" / "student.pre.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    output = PROBABILITIES_NAME if probabilities else LOGITS_NAME
    module = WithPreprocessing(run.student, spec, probabilities).eval()
    side = int(spec.uint8_size or 0)
    example = torch.randint(0, 256, (2, spec.channels, side, side), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    meta = _metadata(run.metadata(), spec, probabilities)
    _save(module, path, example, output, meta)
    log.info("wrote %s (%.2f MB)", path, path.stat().st_size / 1e6)
    figures = check_parity(module, load_artefact(path, "onnx"),
                           uint8_test_batches(run.data, spec))
    tolerance = DEFAULT_TOLERANCE if tolerance is None else float(tolerance)
    min_agreement = DEFAULT_MIN_AGREEMENT if min_agreement is None else float(min_agreement)
    failures = _parity_failures(figures, False, tolerance, min_agreement)
    report = {"kind": "kdlab-export-parity", "format": "onnx", "precision": "fp32",
              "preprocessing_inside": True, "output": output, "file": path.name,
              "input": meta["input"], "input_spec": spec.to_dict(), "source": meta["source"],
              **figures, "tolerance": tolerance, "min_agreement": min_agreement,
              "passed": not failures, "failures": failures, "versions": versions()}
    ppath = parity_path(path)
    atomic_write(ppath, json.dumps(report, indent=2) + "\n")
    if failures:
        raise ParityError(f"parity check of {path} failed: {'; '.join(failures)} (files kept; "
                          f"see {ppath.name})")
    return ExportResult(path=path, parity_path=ppath, report=report)
