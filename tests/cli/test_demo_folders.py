"""``kdlab demo`` and ``kdlab demo --quick`` write to separate folders by default, so running one
never breaks the other; the quick demo says that its numbers are a smoke test, not results.

The demo runs here on tiny synthetic IDX files found through ``$KDLAB_DATA`` (never the real
Fashion-MNIST) with tiny plans patched over ``kdlab.cli.demo.FULL`` / ``QUICK``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlab.cli import demo
from kdlab.cli.main import main
from kdlab.data.synthetic import write_idx

#: two plans whose configs differ (teacher epochs), as the real FULL and QUICK do.
TINY_FULL = demo.DemoPlan(teacher="resnet8", student="resnet8", teacher_epochs=2,
                          teacher_fraction=0.5, student_epochs=1, student_fraction=0.5,
                          batch_size=16)
TINY_QUICK = demo.DemoPlan(teacher="resnet8", student="resnet8", teacher_epochs=1,
                           teacher_fraction=0.5, student_epochs=1, student_fraction=0.5,
                           batch_size=16)


@pytest.fixture
def tiny_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder with synthetic Fashion-MNIST-style data and the tiny plans."""
    write_idx(tmp_path / "data", n_train=64, n_test=32)
    monkeypatch.setenv("KDLAB_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(demo, "FULL", TINY_FULL)
    monkeypatch.setattr(demo, "QUICK", TINY_QUICK)
    monkeypatch.setattr(demo, "STUDENT_METHODS", [demo.STUDENT_METHODS[0],
                                                  demo.STUDENT_METHODS[3]])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_default_folders_differ() -> None:
    assert demo.default_out(quick=False) == Path("runs/demo")
    assert demo.default_out(quick=True) == Path("runs/demo-quick")


@pytest.mark.e2e
def test_quick_and_full_demo_do_not_collide(tiny_demo: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "demo", "--quick", "--no-progress"]) == 0
    quick_out = capsys.readouterr().out
    assert main(["-q", "demo", "--no-progress"]) == 0
    full_out = capsys.readouterr().out
    # and the quick demo again, after the full one: finished runs are skipped, nothing refused
    assert main(["-q", "demo", "--quick", "--no-progress"]) == 0

    quick_md = (tiny_demo / "runs/demo-quick/results.md").read_text()
    full_md = (tiny_demo / "runs/demo/results.md").read_text()
    assert quick_md.splitlines()[0] == demo.SMOKE_TEST_NOTE
    assert "not results" in quick_md.splitlines()[0]
    assert "not results" not in full_md and "Smoke test" not in full_md
    assert quick_md.splitlines()[2].startswith("| run |")
    assert full_md.startswith("| run |")
    # the printed table carries the same line above it
    assert "quick demo (smoke test)" in quick_out and demo.SMOKE_TEST_NOTE in quick_out
    assert quick_out.index(demo.SMOKE_TEST_NOTE) < quick_out.index("| run |")
    assert "Smoke test" not in full_out
    for out in ("runs/demo", "runs/demo-quick"):
        assert (tiny_demo / out / "teacher" / "summary.json").is_file()
        assert (tiny_demo / out / "sddkd" / "summary.json").is_file()


@pytest.mark.e2e
def test_out_overrides_the_default(tiny_demo: Path) -> None:
    assert main(["-q", "demo", "--quick", "--no-progress", "--out", "elsewhere"]) == 0
    assert (tiny_demo / "elsewhere" / "results.md").is_file()
    assert not (tiny_demo / "runs").exists()
