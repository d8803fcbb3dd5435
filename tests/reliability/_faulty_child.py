"""Run ``kdlab.cli.main.main`` in a child process with one injected fault (used by the kill tests).

Usage: ``python _faulty_child.py FAULT -- KDLAB ARGS...``. ``FAULT`` is one of

* ``step:N``                  SIGKILL at the start of the N-th optimizer step of the process.
* ``replace:SRC>DST:N``       SIGKILL just before the N-th ``os.replace(SRC, DST)`` (basenames).
* ``partial-save:NAME:N``     the N-th ``torch.save`` into ``NAME`` writes half its bytes, is
                              fsynced, then the process is SIGKILLed (a torn temporary file).
* ``torn-metrics:N``          the N-th metrics append writes half a line, then SIGKILL.

The process kills itself with SIGKILL, exactly like ``kill -9``: no cleanup handler runs.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path
from typing import Any


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str) -> None:
    """Patch the one place named by ``fault``."""
    import torch

    from kdlab.engine import trainer
    from kdlab.runs import checkpoint, rundir

    kind, _, rest = fault.partition(":")
    calls = {"n": 0}

    if kind == "step":
        n = int(rest)
        real_step = trainer.Trainer.backward_step

        def step(self: Any, *args: Any) -> None:
            calls["n"] += 1
            if calls["n"] == n:
                _die()
            real_step(self, *args)

        trainer.Trainer.backward_step = step  # type: ignore[method-assign]
    elif kind == "replace":
        names, _, count = rest.rpartition(":")
        src_name, dst_name = names.split(">")
        n = int(count)
        real_replace = os.replace

        def replace(src: Any, dst: Any, *a: Any, **k: Any) -> None:
            if Path(src).name == src_name and Path(dst).name == dst_name:
                calls["n"] += 1
                if calls["n"] == n:
                    _die()
            real_replace(src, dst, *a, **k)

        # kdlab.core.io.atomic_write looks os.replace up at call time: patch it process-wide.
        os.replace = replace  # type: ignore[assignment]
    elif kind == "partial-save":
        name, _, count = rest.rpartition(":")
        n = int(count)
        real_save = torch.save

        def save(obj: Any, f: Any, *a: Any, **k: Any) -> None:
            if Path(getattr(f, "name", "")).name == name:
                calls["n"] += 1
                if calls["n"] == n:
                    buf = io.BytesIO()
                    real_save(obj, buf, *a, **k)
                    data = buf.getvalue()
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    _die()
            real_save(obj, f, *a, **k)

        checkpoint.torch.save = save  # type: ignore[assignment]
    elif kind == "torn-metrics":
        n = int(rest)
        real_append = rundir.RunDir.append_metrics

        def append(self: Any, record: dict[str, Any]) -> None:
            calls["n"] += 1
            if calls["n"] == n:
                import json

                line = json.dumps(record, sort_keys=True)
                with open(self.metrics_path, "a") as fh:
                    fh.write(line[: len(line) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                _die()
            real_append(self, record)

        rundir.RunDir.append_metrics = append  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown fault {fault!r}")


def main() -> int:
    fault = sys.argv[1]
    assert sys.argv[2] == "--"
    install(fault)
    from kdlab.cli.main import main as kdlab_main

    return kdlab_main(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
