"""The torchvision shim's policy (``KDLAB_TORCHVISION_SHIM``), what it records, and that only
detection installs it.

The unit tests replace the shim's process state and its plain import, so they never touch the
real torchvision; one test runs a fresh interpreter to see this machine's real behaviour (the
shim is process-wide and cannot be undone, so an in-process check would depend on test order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from typing import Any

import pytest

import kdlab.core.torchvision_shim as tvo
from kdlab.core.env import environment_info
from kdlab.core.errors import ConfigError, ModelError

MISSING = "operator torchvision::nms does not exist"


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A shim that has done nothing yet in this process (its state is restored afterwards)."""
    state: dict[str, Any] = {"module": None, "kdlab_ops": False, "compiled": None,
                             "reason": None}
    monkeypatch.setattr(tvo, "_STATE", state)
    monkeypatch.delenv(tvo.ENV_VAR, raising=False)
    monkeypatch.setattr(tvo, "_cuda_torch", lambda: False)
    return state


def _fake_tv(has_ops: bool) -> types.ModuleType:
    mod = types.ModuleType("fake_torchvision")
    mod.extension = types.SimpleNamespace(_has_ops=lambda: has_ops)  # type: ignore[attr-defined]
    return mod


def _ops_missing() -> types.ModuleType:
    raise tvo.TorchvisionOpsMissing(tvo._ops_missing_message(MISSING))


def _never(*args: Any) -> None:
    raise AssertionError("the shim must not be installed here")


@pytest.mark.parametrize("value,policy", [(None, "auto"), ("", "auto"), ("AUTO", "auto"),
                                          (" off ", "off")])
def test_policy_values(value: str | None, policy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if value is None:
        monkeypatch.delenv(tvo.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(tvo.ENV_VAR, value)
    assert tvo.shim_policy() == policy
    assert tvo.shim_state()["policy"] == policy


def test_invalid_policy_is_a_one_line_config_error(fresh: dict[str, Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tvo.ENV_VAR, "on")
    with pytest.raises(ConfigError) as e:
        tvo.import_torchvision_for_detection()
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("environment variable KDLAB_TORCHVISION_SHIM='on' is not one of "
                              "auto, off")
    # recording never fails: env.json and doctor show the bad value
    assert tvo.shim_state()["policy"] == "invalid: 'on'"
    assert environment_info()["torchvision_shim"]["policy"] == "invalid: 'on'"


def test_off_never_installs_and_says_why(fresh: dict[str, Any],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tvo.ENV_VAR, "off")
    monkeypatch.setattr(tvo, "import_torchvision", _ops_missing)
    monkeypatch.setattr(tvo, "_define", _never)
    monkeypatch.setattr(tvo, "_install_kdlab_ops", _never)
    with pytest.raises(ModelError) as e:
        tvo.import_torchvision_for_detection()
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("detection: torchvision ")
    assert MISSING in message and "pip install --no-deps torchvision" in message
    assert message.endswith("(KDLAB_TORCHVISION_SHIM=off keeps kdlab's pure-PyTorch "
                            "nms/roi_align out)")
    # a torchvision that imports but lacks its ops is returned as it is: its own errors surface
    tv = _fake_tv(has_ops=False)
    monkeypatch.setattr(tvo, "import_torchvision", lambda: tv)
    assert tvo.import_torchvision_for_detection() is tv
    assert tvo.shim_state()["installed"] is False and tvo.shim_state()["kdlab_ops"] == []


def test_never_installed_on_a_cuda_torch(fresh: dict[str, Any],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tvo, "_cuda_torch", lambda: True)
    monkeypatch.setattr(tvo, "import_torchvision", _ops_missing)
    monkeypatch.setattr(tvo, "_define", _never)
    monkeypatch.setattr(tvo, "_install_kdlab_ops", _never)
    with pytest.raises(ModelError, match="never stand in for them on a CUDA torch"):
        tvo.import_torchvision_for_detection()
    tv = _fake_tv(has_ops=False)
    monkeypatch.setattr(tvo, "import_torchvision", lambda: tv)
    assert tvo.import_torchvision_for_detection() is tv
    assert tvo.shim_state()["installed"] is False


def test_auto_installs_only_where_the_compiled_ops_are_missing(
        fresh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(tvo, "_install_kdlab_ops", lambda tv, reason: calls.append(reason))
    monkeypatch.setattr(tvo, "_has_schema", lambda name: True)
    compiled = _fake_tv(has_ops=True)
    monkeypatch.setattr(tvo, "import_torchvision", lambda: compiled)
    assert tvo.import_torchvision_for_detection() is compiled
    assert calls == [] and fresh["compiled"] is True

    monkeypatch.setattr(tvo, "_STATE", {**fresh, "module": None, "compiled": None})
    missing = _fake_tv(has_ops=False)
    monkeypatch.setattr(tvo, "import_torchvision", lambda: missing)
    assert tvo.import_torchvision_for_detection() is missing
    assert tvo.import_torchvision_for_detection() is missing  # once
    assert calls == ["torchvision.extension._has_ops() is False"]


def test_shim_state_and_env_json_record_it(fresh: dict[str, Any]) -> None:
    state = tvo.shim_state()
    assert state == {"policy": "auto", "installed": False, "kdlab_ops": [],
                     "compiled_ops": None, "reason": None,
                     "torchvision": tvo._installed_version("torchvision")}
    fresh.update(kdlab_ops=True, compiled=False, reason=MISSING)
    assert environment_info()["torchvision_shim"] == {**state, "installed": True,
                                                      "kdlab_ops": ["nms", "roi_align"],
                                                      "compiled_ops": False, "reason": MISSING}
    json.dumps(environment_info())  # env.json stays JSON


# A fresh interpreter: a torchvision: classifier (never the shim), then detection with
# KDLAB_TORCHVISION_SHIM=off, then auto (the shim where this machine needs it).
_SCRIPT = r"""
import json, logging, os, sys
import torch
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append((record.levelname, record.getMessage()))
logging.getLogger("kdlab").addHandler(Keep(level=logging.WARNING))
from kdlab.core import torchvision_shim as tvo
from kdlab.core.env import environment_info
from kdlab.core.errors import ModelError
from kdlab.models import create_model
out = {"cuda": tvo._cuda_torch()}
try:
    tvo.import_torchvision()
    out["plain"] = "ok"
except tvo.TorchvisionOpsMissing as exc:
    out["plain"] = "ops missing"
except Exception as exc:
    out["plain"] = f"{type(exc).__name__}: {exc}"
try:
    create_model("torchvision:resnet18", num_classes=10)
    out["classifier"] = "ok"
except ModelError as exc:
    out["classifier"] = str(exc)
out["after_classifier"] = tvo.shim_state()
out["tv_modules_left"] = any(m.split(".")[0] == "torchvision" for m in sys.modules)
os.environ["KDLAB_TORCHVISION_SHIM"] = "off"
try:
    tvo.import_torchvision_for_detection()
    out["off"] = "ok"
except ModelError as exc:
    out["off"] = str(exc)
out["after_off"] = tvo.shim_state()
os.environ["KDLAB_TORCHVISION_SHIM"] = "auto"
tv = tvo.import_torchvision_for_detection()
tvo.import_torchvision_for_detection()
out["after_auto"] = environment_info()["torchvision_shim"]
out["warnings"] = records
x, rois = torch.rand(1, 2, 8, 8), torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]])
try:
    tv.ops.roi_pool(x, rois, 2)
    out["roi_pool"] = "ran"
except Exception as exc:
    out["roi_pool"] = f"{type(exc).__name__}: {exc}"
out["nms"] = tv.ops.nms(torch.tensor([[0.0, 0, 2, 2], [0, 0, 2, 2.1]]),
                        torch.tensor([0.9, 0.8]), 0.5).tolist()
print(json.dumps(out))
"""


@pytest.mark.e2e
def test_this_machine_classifier_never_installs_detection_does_once() -> None:
    if tvo._installed_version("torchvision") == "not installed":
        pytest.skip("torchvision is not installed")
    env = {k: v for k, v in os.environ.items() if k != tvo.ENV_VAR}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                          timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["plain"] != "ops missing":
        pytest.skip(f"torchvision's compiled ops load here (plain import: {out['plain']})")
    # classification: one line naming the build to install, nothing installed or left behind
    assert out["classifier"].startswith("arch 'torchvision:resnet18': torchvision ")
    assert "compiled operators do not load with torch" in out["classifier"]
    assert "pip install --no-deps torchvision==" in out["classifier"]
    assert "\n" not in out["classifier"]
    assert out["after_classifier"]["installed"] is False
    assert out["tv_modules_left"] is False
    # off: torchvision's import error, in one line, and still nothing installed
    assert out["off"].startswith("detection: torchvision ") and "KDLAB_TORCHVISION_SHIM=off" \
        in out["off"]
    assert out["after_off"]["installed"] is False and out["after_off"]["policy"] == "off"
    if out["cuda"]:
        pytest.skip("a CUDA torch: the shim never acts")
    state = out["after_auto"]
    assert state["installed"] is True and state["kdlab_ops"] == ["nms", "roi_align"]
    assert state["policy"] == "auto" and state["compiled_ops"] is False
    warnings = [m for level, m in out["warnings"] if level == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "kdlab's pure-PyTorch nms and roi_align stand in" in warnings[0]
    assert "KDLAB_TORCHVISION_SHIM=off" in warnings[0]
    assert out["roi_pool"].startswith("RuntimeError: Couldn't load custom C++ ops")
    assert out["nms"] == [0]
