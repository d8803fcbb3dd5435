"""The README's "use a kdlab loss in your own training loop" examples run exactly as written.

Each example is the fenced ``python`` block right after its marker comment in README.md
(``<!-- readme-example: NAME -->``); it runs unchanged in a fresh interpreter, in an empty
folder, as a new user would paste it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
SRC = README.parent / "src"


def readme_example(name: str) -> str:
    """The code of the fenced block that follows ``<!-- readme-example: NAME -->``."""
    text = README.read_text()
    found = re.search(rf"<!-- readme-example: {re.escape(name)} -->\n```python\n(.*?)\n```\n",
                      text, re.S)
    assert found, f"README.md has no python block after <!-- readme-example: {name} -->"
    return found.group(1) + "\n"


def run_example(code: str, folder: Path) -> subprocess.CompletedProcess[str]:
    script = folder / "example.py"
    script.write_text(code)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, str(script)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.e2e
def test_loss_example_runs(tmp_path: Path) -> None:
    code = readme_example("loss")
    assert len(code.splitlines()) <= 14, "the loss example is the short entry point"
    done = run_example(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.e2e
def test_training_loop_example_runs(tmp_path: Path) -> None:
    code = readme_example("training-loop")
    for name in ("multiscale_logits(", "sdd_loss(", "load_checkpoint(", "loader", "optimizer"):
        assert name in code, name
    assert len(code.splitlines()) <= 35, "keep the README's loop short"
    done = run_example(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    loss = re.fullmatch(r"SD-KD loss after one epoch: (\d+\.\d{3})\n", done.stdout)
    assert loss and float(loss.group(1)) > 0, done.stdout
    assert list(tmp_path.iterdir()) == [tmp_path / "example.py"], "the example wrote files"


@pytest.mark.parametrize("name", ["loss", "training-loop"])
def test_examples_need_no_data_or_files(name: str) -> None:
    code = readme_example(name)
    assert "load_dataset" not in code and "open(" not in code


def bash_example(name: str) -> str:
    """The code of the fenced ``bash`` block that follows ``<!-- readme-example: NAME -->``."""
    found = re.search(rf"<!-- readme-example: {re.escape(name)} -->\n```bash\n(.*?)\n```\n",
                      README.read_text(), re.S)
    assert found, f"README.md has no bash block after <!-- readme-example: {name} -->"
    return found.group(1) + "\n"


def write_png_folders(root: Path, classes: int = 3, train: int = 12, val: int = 2) -> None:
    """``root/train|val/class<k>/*.png``: 20x24 RGB images whose colour depends on the class."""
    from PIL import Image  # optional dependency (class-folder data)

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for k in range(n):
                pixels = rng.integers(0, 60, (20, 24, 3)) + 60 * c
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{k}.png")


@pytest.mark.e2e
def test_own_images_example_runs(tmp_path: Path) -> None:
    """The README's "Your own images" commands, as written, from PNG folders to an ONNX file."""
    code = bash_example("own-images")
    assert len(code.splitlines()) <= 20, "keep the own-images recipe short"
    write_png_folders(tmp_path / "my_images")
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "sd_dkd" / "summary.json").is_file()
    assert list((tmp_path / "runs" / "sd_dkd" / "export").glob("*.onnx"))
    assert (tmp_path / "runs" / "sd_dkd" / "export" / "hub" / "model.safetensors").is_file()
    shown = [ln.split()[1] for ln in done.stdout.splitlines() if ln.startswith("my_images/")]
    assert len(shown) == 6 and set(shown) <= {"class0", "class1", "class2"}, done.stdout
    assert "warmup_epochs" not in done.stderr  # the example's warm-up fits its schedule
