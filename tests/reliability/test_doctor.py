"""``kdlab doctor``: environment table, ``--json``, exit 0 when no check fails, 1 otherwise."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kdlab.cli import doctor
from kdlab.cli.main import main


def test_table_and_exit_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["doctor", "--run-dir", str(tmp_path / "new" / "run"), "--arch", "resnet8"]) == 0
    out = capsys.readouterr().out
    for text in ("Environment", "torch_build", "cpu_bf16", "torch_threads", "gpus", "Datasets",
                 "fashion_mnist", "cifar100", "Disk", "Checks",
                 "run directory writable, fsync and rename work",
                 "free disk for 4 checkpoints of resnet8", "0 failed", "Detection",
                 "torchvision", "pycocotools"):
        assert text in out, text
    assert not list(tmp_path.rglob(".kdlab-doctor-*")), "probe file left behind"


def test_json_output(tmp_path: Path, write_cfg, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_cfg(tmp_path)
    capsys.readouterr()
    assert main(["doctor", "--json", "--run-dir", str(tmp_path), "--config", str(cfg)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] is True
    env = rep["environment"]
    assert {"kdlab", "torch", "python", "torch_build", "cpu_bf16", "torch_threads",
            "gpus"} <= env.keys()
    names = {c["name"]: c["status"] for c in rep["checks"]}
    assert names["config valid"] == "ok"
    assert names["teacher checkpoint readable (weights_only)"] == "ok"
    assert names["free disk for 4 checkpoints of resnet8"] == "ok"
    assert [d["path"] for d in rep["disk"]][-1] == str(tmp_path)
    assert {d["name"] for d in rep["datasets"]} == {"fashion_mnist", "cifar10", "cifar100"}


def test_datasets_found_via_kdlab_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    from kdlab.data.cifar import CIFAR_SPECS

    for name in CIFAR_SPECS["cifar10"].files:
        (folder / name).write_bytes(b"x")
    monkeypatch.setenv("KDLAB_DATA", str(tmp_path))
    found = {d["name"]: d["path"] for d in doctor.datasets()}
    assert found["cifar10"] == str(folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_run_dir_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["doctor", "--run-dir", str(ro), "--arch", "resnet8"]) == 1
    finally:
        ro.chmod(0o700)


def test_failing_checks_exit_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """fsync failing, too little disk and a broken config: each is a FAIL, exit status 1."""
    real_fsync = os.fsync

    def no_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(doctor.os, "fsync", no_fsync)
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("student: {arch: resnet8}\noptim: {lrr: 1}\n")
    capsys.readouterr()
    assert main(["doctor", "--run-dir", str(tmp_path), "--config", str(bad_cfg),
                 "--arch", "resnet8", "--checkpoints", "10000000"]) == 1
    monkeypatch.setattr(doctor.os, "fsync", real_fsync)
    out = capsys.readouterr().out
    fails = [ln for ln in out.splitlines() if ln.strip().startswith("FAIL")]
    assert any("fsync" in ln and "Input/output error" in ln for ln in fails), out
    assert any("free disk for 10000000 checkpoints" in ln for ln in fails), out
    assert any("config valid" in ln and "optim.lrr" in ln for ln in fails), out
    assert "3 failed" in out
    assert not list(tmp_path.glob(".kdlab-doctor-*")), "probe file left behind"


def test_corrupt_teacher_checkpoint_fails(tmp_path: Path, write_cfg,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "t.pth"
    bad.write_bytes(b"garbage")
    cfg = write_cfg(tmp_path, teacher={"checkpoint": str(bad)})
    assert main(["doctor", "--json", "--run-dir", str(tmp_path), "--config", str(cfg)]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] is False
    assert {c["name"]: c["status"] for c in rep["checks"]}[
        "teacher checkpoint readable (weights_only)"] == "fail"


def test_detection_section_never_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdlab.core import torchvision_shim as torchvision_ops

    det = doctor.environment()["detection"]
    assert {"torchvision", "pycocotools", "shim_policy", "shim_installed"} <= det.keys()
    if det["torchvision"] != "not installed" and "unusable" not in det["torchvision"]:
        assert det["nms"] in ("kdlab (pure PyTorch)", "torchvision (compiled)",
                              "missing (torchvision's compiled ops do not load)")
        assert det["roi_align"] == det["nms"]
        kdlab_serves = det["nms"] == "kdlab (pure PyTorch)"
        assert det["shim_installed"] == ("yes: nms, roi_align" if kdlab_serves else "no")
    assert det["shim_policy"] == torchvision_ops.shim_state()["policy"]

    def broken() -> dict[str, str]:
        raise RuntimeError("boom")

    monkeypatch.setattr(torchvision_ops, "ops_backend", broken)
    monkeypatch.setattr(torchvision_ops, "shim_state", broken)
    assert doctor.detection() == {"torchvision": "unknown (RuntimeError: boom)",
                                  "shim_policy": "unknown (RuntimeError: boom)"}
