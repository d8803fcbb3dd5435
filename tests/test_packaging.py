"""kdlab as a user gets it: a wheel built from the checkout, installed into a clean venv
(issue 23).

The wheel is built (``pip wheel --no-deps --no-build-isolation``, the current environment's
setuptools, offline) from a copy of the checkout's files (git's tracked and untracked,
not-ignored files: what a fresh clone plus the work in progress holds; building in place would
write ``build/`` and ``*.egg-info`` into the checkout and could pick up stale ``build/lib``
files). Its contents are checked: only the ``kdlab`` package and its dist-info, every module and
data file of every package, no tests, runs or caches.

Then a venv without system site packages gets torch pinned exactly as the Makefile pins it
(``TORCH_VERSION``, installed first, so pip never resolves a torch from a range), then the wheel
with torch constrained to that pin, and from that venv, outside the checkout: the installed
version is the project's, the packaged paper CSV is readable, ``kdlab doctor`` exits 0 and a zoo
model runs a forward pass. Skipped only when pip cannot get the pinned torch from any index or
cache (a network failure of that step); about 40 s with a local torch wheel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
#: files of src/kdlab that stay out of the wheel on purpose: documentation of the source tree
#: (the CSV's sources; docs link to it at its source path)
SOURCE_ONLY = frozenset({"kdlab/report/PAPER_RESULTS.md"})
#: the checkout's folders that are not kdlab (``kdlab/runs`` is a package; ``runs/`` is not)
CHECKOUT_FOLDERS = ("tests/", "runs/", "benchmarks/", "configs/", "docs/", "src/", "build/",
                    "dist/", ".venv/", ".git/")
#: pip's words for "no index or cache could be reached" (a torch install that fails otherwise
#: is a failure, not a skip)
NETWORK_ERRORS = ("(from versions: none)", "NewConnectionError", "Max retries exceeded",
                  "Failed to establish a new connection", "Temporary failure in name resolution",
                  "Network is unreachable", "Name or service not known", "ConnectionError",
                  "ReadTimeoutError", "ProxyError")

#: run inside the installed venv (``python -I``): what the installed kdlab says about itself
PROBE = """
import importlib.metadata, importlib.resources, json, sys
import torch
import kdlab
from kdlab.models import create_model
from kdlab.report.paper import load_paper_results
csv_text = importlib.resources.files("kdlab.report").joinpath("paper_results.csv").read_text(
    encoding="utf-8")
torch.manual_seed(0)
model = create_model("resnet8", num_classes=10).eval()
with torch.no_grad():
    logits = model(torch.randn(2, 3, 32, 32)).logits
print(json.dumps({
    "file": kdlab.__file__, "version": kdlab.__version__,
    "dist_version": importlib.metadata.version("kdlab"), "torch": torch.__version__,
    "csv_lines": csv_text.splitlines(), "paper_cells": len(load_paper_results()),
    "logits_shape": list(logits.shape), "logits_finite": bool(torch.isfinite(logits).all()),
    "prefix": sys.prefix, "path": sys.path,
}))
"""


def project_version() -> str:
    """``[project] version`` of pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    project = text.split("\n[project]\n", 1)[1].split("\n[", 1)[0]
    match = re.search(r'^version\s*=\s*"([^"]+)"', project, re.M)
    assert match, "pyproject.toml has no [project] version"
    return match.group(1)


def makefile_torch_version() -> str:
    """The torch release the Makefile installs (``TORCH_VERSION ?= X``)."""
    match = re.search(r"^TORCH_VERSION\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert match, "the Makefile sets no TORCH_VERSION"
    return match.group(1)


def _run(cmd: list[str | Path], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def _output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _copy_checkout(dest: Path) -> Path:
    """Copy git's tracked and untracked, not-ignored files of the checkout into ``dest``."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                  timeout=60, cwd=ROOT) if shutil.which("git") else None
    if listed is None or listed.returncode != 0:
        pytest.fail("cannot list the checkout's files with git ls-files"
                    + (f": {_output(listed)}" if listed else ": no git"))
    for rel in filter(None, listed.stdout.split("\0")):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the work tree is not there
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, the source tree it was built from)."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = _copy_checkout(tmp / "source")
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "--no-input", "-q", "-w", tmp / "dist", source], timeout=300)
    assert proc.returncode == 0, f"pip wheel failed: {_output(proc)}"
    wheels = list((tmp / "dist").glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], source


def test_wheel_holds_the_package_and_nothing_else(built: tuple[Path, Path]) -> None:
    wheel, source = built
    version = project_version()
    assert wheel.name == f"kdlab-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(f"kdlab-{version}.dist-info/entry_points.txt").decode()
        metadata = z.read(f"kdlab-{version}.dist-info/METADATA").decode()
    assert {n.split("/", 1)[0] for n in names} == {"kdlab", f"kdlab-{version}.dist-info"}
    assert [n for n in names if n.startswith(CHECKOUT_FOLDERS) or "__pycache__/" in n
            or n.endswith((".pyc", ".pyo"))] == []
    # every module and data file of every package under src/kdlab (and no stray one)
    package_files = {p.relative_to(source / "src").as_posix()
                     for p in (source / "src" / "kdlab").rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert "kdlab/report/paper_results.csv" in package_files
    assert SOURCE_ONLY <= package_files, "SOURCE_ONLY names a file that no longer exists"
    packaged = {n for n in names if n.startswith("kdlab/")}
    assert sorted(package_files - SOURCE_ONLY - packaged) == []
    assert sorted(packaged - package_files) == []
    # every folder of python files is a regular package: setuptools' find (namespaces on by
    # default) would ship a folder without __init__.py as a namespace package
    folders = {Path(f).parent for f in package_files if f.endswith(".py")}
    assert sorted(str(d) for d in folders if not (source / "src" / d / "__init__.py").is_file()) \
        == []
    assert re.search(r"^kdlab = kdlab\.cli\.main:main$", entry_points, re.M)
    assert f"\nVersion: {version}\n" in metadata
    assert re.search(r"^Requires-Dist: torch>=", metadata, re.M)


@pytest.fixture(scope="module")
def venv(built: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean venv with the Makefile's torch, then the wheel (torch constrained to that pin)."""
    wheel, _ = built
    tmp = tmp_path_factory.mktemp("venv")
    env_dir = tmp / "venv"
    proc = _run([sys.executable, "-m", "venv", env_dir], timeout=120)
    assert proc.returncode == 0, f"python -m venv failed: {_output(proc)}"
    cfg = (env_dir / "pyvenv.cfg").read_text()
    assert re.search(r"^include-system-site-packages\s*=\s*false", cfg, re.M), cfg
    python = env_dir / "bin" / "python"
    torch_pin = f"torch=={makefile_torch_version()}"
    proc = _run([python, "-m", "pip", "install", "--no-input", "--timeout", "20",
                 "--retries", "1", torch_pin], timeout=400, env=_clean_env(env_dir))
    if proc.returncode != 0:
        said = [line.strip() for line in (proc.stdout + proc.stderr).splitlines()
                if any(word in line for word in NETWORK_ERRORS)]
        if said:
            pytest.skip(f"pip cannot get {torch_pin} from any index or cache: "
                        + " / ".join(s[:160] for s in said[:2]))
        pytest.fail(f"pip install {torch_pin} failed: {_output(proc)}")
    constraints = tmp / "constraints.txt"
    constraints.write_text(torch_pin + "\n")
    proc = _run([python, "-m", "pip", "install", "--no-input", "-c", constraints, wheel],
                timeout=400, env=_clean_env(env_dir))
    assert proc.returncode == 0, f"pip install {wheel.name} failed: {_output(proc)}"
    return env_dir


def _clean_env(env_dir: Path) -> dict[str, str]:
    """The environment of a command in ``env_dir``: no PYTHONPATH, user site or outer venv;
    pip's own settings (index, find-links, cache) are kept."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def test_installed_wheel_works_in_a_clean_venv(venv: Path, tmp_path: Path) -> None:
    version = project_version()
    proc = _run([venv / "bin" / "python", "-I", "-c", PROBE], timeout=120, cwd=tmp_path,
                env=_clean_env(venv))
    assert proc.returncode == 0, _output(proc)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # the venv's own copy: not the checkout's src, not the outer environment's
    site = Path(got["prefix"]).resolve()
    assert site == venv.resolve()
    assert Path(got["file"]).resolve().is_relative_to(site)
    outer = [ROOT, *([Path(sys.prefix)] if sys.prefix != sys.base_prefix else [])]
    assert [p for p in got["path"]
            if p and any(Path(p).resolve().is_relative_to(o.resolve()) for o in outer)] == []
    assert got["version"] == got["dist_version"] == version
    assert got["torch"].split("+")[0] == makefile_torch_version()
    # the packaged paper CSV: present, readable, and what the report loads
    assert got["csv_lines"][0] == "source,dataset,teacher,student,method,metric,value"
    assert len(got["csv_lines"]) > 10
    assert got["paper_cells"] > 10
    assert got["logits_shape"] == [2, 10] and got["logits_finite"]

    doctor = _run([venv / "bin" / "kdlab", "doctor"], timeout=120, cwd=tmp_path,
                  env=_clean_env(venv))
    assert doctor.returncode == 0, _output(doctor)
    assert re.search(rf"^\s*kdlab\s+{re.escape(version)}\s*$", doctor.stdout, re.M), \
        doctor.stdout
    shown = _run([venv / "bin" / "kdlab", "--version"], timeout=60, cwd=tmp_path,
                 env=_clean_env(venv))
    assert shown.returncode == 0 and shown.stdout.strip() == f"kdlab {version}", _output(shown)
