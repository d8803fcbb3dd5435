"""The zoo matches the CRD / mdistiller reference definitions (data measured once from them).

* ``golden_state_dicts.json``: every model's state-dict keys, shapes and parameter count, dumped
  from the reference definitions (CRD ``models/``, cross-checked against mdistiller).
* ``golden/<name>.pth``: seeded, randomly initialised reference weights in the CRD teacher format
  ``{"model": state_dict}`` (BN running statistics set by train-mode forwards), with
  ``golden/<name>_expected.pt`` holding a fixed input and the reference's eval-mode logits.
* ``golden_synthetic_logits.json``: for every model, the reference logits (float64, eval and
  train mode) after filling its state dict with :func:`synthetic_state_dict`, a deterministic
  fill that depends only on the (key, shape) layout, so no weight file is needed.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlab.models import create_model, list_models, load_checkpoint
from kdlab.models.registry import MODELS

HERE = Path(__file__).parent
GOLDEN_DIR = HERE / "golden"
STATE_DICTS = json.loads((HERE / "golden_state_dicts.json").read_text())
SYNTHETIC = json.loads((HERE / "golden_synthetic_logits.json").read_text())
CHECKPOINT_MODELS = ["resnet8", "resnet14", "wrn_16_1"]


def synthetic_state_dict(layout: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Deterministic float64 values for a state-dict layout (numpy PCG64, seeded by key name).

    Conv / linear weights ~ N(0, 2 / fan_in), biases ~ N(0, 0.1^2), BN scales in [0.5, 1.5],
    running means ~ N(0, 0.2^2), running variances in [0.5, 2].
    """
    names = {k for k, _ in layout}
    out: dict[str, torch.Tensor] = {}
    for key, shape in layout:
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        prefix = key.rsplit(".", 1)[0]
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(1, dtype=torch.long)
            continue
        if key.endswith("running_var"):
            values = rng.uniform(0.5, 2.0, shape)
        elif key.endswith("running_mean"):
            values = rng.normal(0.0, 0.2, shape)
        elif key.endswith("weight") and f"{prefix}.running_var" in names:
            values = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("bias"):
            values = rng.normal(0.0, 0.1, shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            values = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        out[key] = torch.from_numpy(np.asarray(values, dtype=np.float64))
    return out


def synthetic_input(in_channels: int = 3, size: int = 32) -> torch.Tensor:
    """A fixed float64 ``2 x C x size x size`` input batch."""
    rng = np.random.default_rng(20240501)
    return torch.from_numpy(rng.standard_normal((2, in_channels, size, size)))


def test_golden_covers_the_cifar_zoo() -> None:
    assert set(STATE_DICTS) == set(SYNTHETIC)
    assert set(STATE_DICTS) <= set(list_models())
    factories = {name: MODELS.get(name) for name in STATE_DICTS}
    assert {f.__module__.rsplit(".", 1)[0] for f in factories.values()} == {"kdlab.models.cifar"}
    # the other way round: a newly registered CIFAR model must bring its golden entry
    registered = {n for n in list_models()
                  if MODELS.get(n).__module__.startswith("kdlab.models.cifar.")}
    assert registered == set(STATE_DICTS), sorted(registered ^ set(STATE_DICTS))


@pytest.mark.parametrize("name", sorted(STATE_DICTS))
def test_state_dict_layout_matches_reference(name: str) -> None:
    model = create_model(name, num_classes=100)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == STATE_DICTS[name]["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == STATE_DICTS[name]["num_params"]


@pytest.mark.parametrize("name", CHECKPOINT_MODELS)
def test_reference_checkpoint_gives_reference_logits(name: str) -> None:
    model = create_model(name, num_classes=100)
    obj = load_checkpoint(model, GOLDEN_DIR / f"{name}.pth")
    assert set(obj) == {"model"}
    expected = torch.load(GOLDEN_DIR / f"{name}_expected.pt", weights_only=True)
    # The running statistics are far from their initial (0, 1), so eval-mode BN is exercised.
    assert any(
        k.endswith("running_var") and not torch.allclose(v, torch.ones_like(v))
        for k, v in obj["model"].items()
    )
    model.eval()
    with torch.no_grad():
        out = model(expected["input"])
    torch.testing.assert_close(out.logits, expected["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_synthetic_weights_give_reference_logits(name: str) -> None:
    model = create_model(name, num_classes=100).double()
    layout = [(k, shape) for k, shape in STATE_DICTS[name]["state_dict"]]
    model.load_state_dict(synthetic_state_dict(layout), strict=True)
    x = synthetic_input()
    for mode in ("eval", "train"):
        model.train(mode == "train")
        with torch.no_grad():
            logits = model(x).logits
        expected = torch.tensor(SYNTHETIC[name][mode], dtype=torch.float64)
        scale = expected.abs().max().item()
        torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-9 * max(scale, 1.0))
