"""`kdlab report`'s HTML page opened in a real browser: headless Chromium (issue 23).

The report is built from real (tiny, synthetic-data) ``kdlab distill`` runs plus one failed run,
then opened in headless Chromium, driven through the DevTools protocol over
``--remote-debugging-pipe`` (JSON messages on file descriptors 3 and 4: nothing but the
standard library). The page fails the check on any console error (a JavaScript exception, a
``console.error``, a resource that did not load), any ``<img>`` that did not load
(``naturalWidth == 0``), a request for anything but the page itself and ``data:`` URIs (the
report is one self-contained file), no results table, or a table without body rows (or with a
row whose cell count differs from the header's). The negative tests break a copy of the page in
each of those ways and show the check catches it.

Skipped, with the reason, only where no Chromium binary is found (``KDLAB_CHROMIUM`` names one
explicitly; Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdlab.report.build import Report, build_report
from support import run_distill, save_random_teacher

pytestmark = pytest.mark.e2e

#: an explicit Chromium / Chrome binary (else the first of CHROMIUM_NAMES on PATH)
CHROMIUM_ENV = "KDLAB_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: seconds one DevTools call (or the page load) may take
TIMEOUT_S = 60.0

#: the failed run's error: markup that, unescaped, would load an image that does not exist
FAILED_ERROR = 'ValueError: bad <img src="no_such_file.png"> & more'

#: what the page reports after its load event (and a short pause for late errors): tables
#: (heading, header cell count, cell count of each body row), images (name, loaded, natural
#: width), the visible text.
PAGE_PROBE = """(async () => {
  await new Promise(resolve => setTimeout(resolve, 100));
  const tables = Array.from(document.querySelectorAll('table')).map(t => {
    let el = t.closest('div.table') || t;
    let prev = el.previousElementSibling;
    while (prev && prev.tagName !== 'H2') prev = prev.previousElementSibling;
    const head = t.tHead && t.tHead.rows.length ? t.tHead.rows[0].cells.length : 0;
    const rows = Array.from(t.tBodies).flatMap(b => Array.from(b.rows)).map(r => r.cells.length);
    return {heading: prev ? prev.textContent : '', columns: head, rows: rows};
  });
  const images = Array.from(document.images).map(i => ({
    name: i.alt || i.getAttribute('src').slice(0, 60), complete: i.complete,
    width: i.naturalWidth}));
  return {tables: tables, images: images, text: document.body.innerText};
})()"""


def find_chromium() -> str | None:
    """The Chromium binary to use: ``$KDLAB_CHROMIUM``, else the first of
    :data:`CHROMIUM_NAMES` on ``PATH``; None when there is none."""
    explicit = os.environ.get(CHROMIUM_ENV)
    if explicit:
        return shutil.which(explicit)
    return next((p for name in CHROMIUM_NAMES if (p := shutil.which(name))), None)


@dataclass
class PageCheck:
    """What headless Chromium saw of one page."""

    url: str
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""

    def problems(self) -> list[str]:
        """Every defect found, one line each; empty for a good report page."""
        out = [f"console error: {e}" for e in self.console_errors]
        out += [f"outside resource requested: {u[:100]}" for u in self.requests
                if u != self.url and not u.startswith("data:")]
        out += [f"image did not load: {i['name']} (naturalWidth {i['width']})"
                for i in self.images if not i["complete"] or i["width"] == 0]
        if not self.tables:
            out.append("no results table")
        for t in self.tables:
            if not t["rows"]:
                out.append(f"results table {t['heading']!r} has no rows")
            out += [f"results table {t['heading']!r}: a row of {n} cells under "
                    f"{t['columns']} headers" for n in t["rows"] if n != t["columns"]]
        return out


class Chromium:
    """Headless Chromium driven through the DevTools protocol over
    ``--remote-debugging-pipe``: the browser reads NUL-terminated JSON commands from file
    descriptor 3 and writes replies and events to descriptor 4."""

    def __init__(self, binary: str, profile: Path) -> None:
        cmd_read, self._cmd_write = os.pipe()
        self._out_read, out_write = os.pipe()

        def as_fds_3_and_4() -> None:  # in the child, before exec
            cmd = fcntl.fcntl(cmd_read, fcntl.F_DUPFD_CLOEXEC, 10)
            out = fcntl.fcntl(out_write, fcntl.F_DUPFD_CLOEXEC, 10)
            os.dup2(cmd, 3)
            os.dup2(out, 4)

        self.log = profile / "chromium.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [binary, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
                 "--no-default-browser-check", "--remote-debugging-pipe",
                 f"--user-data-dir={profile / 'profile'}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=as_fds_3_and_4, close_fds=False)
        os.close(cmd_read)
        os.close(out_write)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []

    def call(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None) -> dict[str, Any]:
        """Send one command and return its result (events that arrive meanwhile are kept)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method,
                                   "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._cmd_write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def wait_for(self, method: str, session: str) -> None:
        """Wait for the event ``method`` of ``session``."""
        deadline = time.monotonic() + TIMEOUT_S
        while not any(e.get("method") == method and e.get("sessionId") == session
                      for e in self._events):
            self._events.append(self._receive(deadline))

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out_read], [], [], left)[0]:
                raise TimeoutError(f"no reply from Chromium in {TIMEOUT_S} s")
            chunk = os.read(self._out_read, 1 << 20)
            if not chunk:
                raise EOFError("Chromium closed the DevTools pipe: "
                               + self.log.read_text(errors="replace")[-2000:])
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def check(self, page: Path) -> PageCheck:
        """Open ``page`` in a new tab, wait for its load event and report what it saw."""
        url = page.resolve().as_uri()
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget",
                            {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.call(f"{domain}.enable", session=session)
        self.call("Page.navigate", {"url": url}, session=session)
        self.wait_for("Page.loadEventFired", session)
        probe = self.call("Runtime.evaluate", {"expression": PAGE_PROBE, "awaitPromise": True,
                                               "returnByValue": True}, session=session)
        if "exceptionDetails" in probe:
            raise RuntimeError(f"the page probe failed: {probe['exceptionDetails']}")
        self.call("Target.closeTarget", {"targetId": target})
        found = probe["result"]["value"]
        out = PageCheck(url, tables=found["tables"], images=found["images"],
                        text=found["text"])
        for event in self._events:
            if event.get("sessionId") != session:
                continue
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                d = params["exceptionDetails"]
                out.console_errors.append(d.get("exception", {}).get("description")
                                          or d.get("text", "exception"))
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error",
                                                                             "assert"):
                out.console_errors.append(" ".join(str(a.get("value", a.get("description")))
                                                   for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                out.console_errors.append(f"{entry['text']} ({entry.get('url', '')[:100]})")
            elif method == "Network.requestWillBeSent":
                out.requests.append(params["request"]["url"])
        self._events = [e for e in self._events if e.get("sessionId") != session]
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (OSError, EOFError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_write)
        os.close(self._out_read)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    binary = find_chromium()
    if binary is None:
        pytest.skip(f"no Chromium binary found (looked for ${CHROMIUM_ENV}, then "
                    f"{', '.join(CHROMIUM_NAMES)} on PATH; Debian: apt-get install chromium)")
    chromium = Chromium(binary, tmp_path_factory.mktemp("chromium"))
    try:
        yield chromium
    finally:
        chromium.close()


def _runs(root: Path) -> Path:
    """Three real 2-epoch ``kdlab distill`` runs (KD seeds 0 and 1, DKD seed 0: two rows) of
    resnet8 from a random resnet14 on synthetic 16 px images, and one failed run."""
    teacher = save_random_teacher(root / "teacher.pth", num_classes=4, seed=0, arch="resnet14")
    for method, seed in (("kd", 0), ("kd", 1), ("dkd", 0)):
        name = f"{method}/resnet14_resnet8"
        run_distill(root / "runs" / name / f"seed{seed}", {
            "name": name, "seed": seed,
            "data": {"name": "synthetic", "batch_size": 16, "eval_batch_size": 16,
                     "synthetic": {"n_train": 64, "n_test": 32, "num_classes": 4, "size": 16}},
            "student": {"arch": "resnet8"},
            "teacher": {"arch": "resnet14", "checkpoint": str(teacher)},
            "method": {"name": method, **({"params": {"warmup_epochs": 1}}
                                          if method == "dkd" else {})},
            "optim": {"epochs": 2, "milestones": [], "lr": 0.05},
            "runtime": {"threads": 1, "amp": "off"},
        })
    failed = root / "runs" / "nkd" / "resnet14_resnet8" / "seed0"
    failed.mkdir(parents=True)
    (failed / "config.yaml").write_text(yaml.safe_dump(
        {"name": "nkd/resnet14_resnet8", "student": {"arch": "resnet8"},
         "method": {"name": "nkd"}}))
    (failed / "status.json").write_text(json.dumps(
        {"state": "failed", "time": 1_700_000_000.0, "epoch": 1, "error": FAILED_ERROR}))
    return root / "runs"


@pytest.fixture(scope="module")
def report(browser: Chromium, tmp_path_factory: pytest.TempPathFactory) -> Report:
    """The report of :func:`_runs` (built only where Chromium is found)."""
    root = tmp_path_factory.mktemp("browser_report")
    return build_report(_runs(root), root / "report")


def test_report_opens_clean_in_chromium(browser: Chromium, report: Report) -> None:
    assert report.html.name == "results.html"
    page = browser.check(report.html)
    assert page.problems() == []
    assert [t["heading"] for t in page.tables] == ["synthetic"]
    assert len(report.groups) == 2  # kd (2 seeds), dkd: one full row each
    assert page.tables[0]["rows"] == [page.tables[0]["columns"]] * 2
    # the table's grid figure, loaded and decoded to real pixels
    assert [(i["name"], i["width"] > 100) for i in page.images] == [("grid_synthetic.png", True)]
    assert page.requests[0] == page.url
    # the failed run is listed, its error shown as text (escaped), not as markup
    assert "Unfinished or failed runs (1)" in page.text
    assert FAILED_ERROR in page.text


def _first_img_src(html: str, new_src: str) -> str:
    return re.sub(r'src="data:image/png;base64,[^"]*"', f'src="{new_src}"', html, count=1)


def _corrupt_png(html: str) -> str:
    # the PNG signature and header survive; the image data is cut off
    return re.sub(r'(src="data:image/png;base64,[^"]{64})[^"]*"', r'\1"', html, count=1)


def _before_body_end(snippet: str) -> Callable[[str], str]:
    return lambda html: html.replace("</body>", f"{snippet}\n</body>", 1)


# (defect, how to break the page, a line that check must report)
DEFECTS: list[tuple[str, Callable[[str], str], str]] = [
    ("missing image file", lambda h: _first_img_src(h, "no_such_plot.png"),
     "console error: Failed to load resource"),
    ("missing image file", lambda h: _first_img_src(h, "no_such_plot.png"),
     "image did not load: grid_synthetic.png"),
    ("corrupt image data", _corrupt_png, "image did not load: grid_synthetic.png"),
    ("script exception", _before_body_end("<script>undefinedReportFunction();</script>"),
     "console error: ReferenceError: undefinedReportFunction is not defined"),
    ("console.error", _before_body_end("<script>console.error('chart missing');</script>"),
     "console error: chart missing"),
    ("empty table", lambda h: re.sub(r"<tbody>.*?</tbody>", "<tbody></tbody>", h,
                                     flags=re.S),
     "results table 'synthetic' has no rows"),
    ("no table", lambda h: re.sub(r'<div class="table">.*?</div>', "", h, flags=re.S),
     "no results table"),
    ("ragged row", lambda h: h.replace("</td></tr>", "</td><td>x</td></tr>", 1),
     "results table 'synthetic': a row of"),
    ("outside resource", lambda h: _first_img_src(h, "grid_synthetic.png"),
     "outside resource requested: file://"),
]


@pytest.mark.parametrize(("defect", "breaking", "expected"), DEFECTS,
                         ids=[f"{d}-{i}" for i, (d, _, _) in enumerate(DEFECTS)])
def test_check_catches_a_broken_copy(browser: Chromium, report: Report, defect: str,
                                     breaking: Callable[[str], str], expected: str) -> None:
    html = report.html.read_text(encoding="utf-8")
    broken = breaking(html)
    assert broken != html, f"the {defect} mutation did not apply"
    copy = report.out_dir / f"broken_{re.sub(r'[^a-z]+', '_', defect)}.html"
    copy.write_text(broken, encoding="utf-8")
    try:
        problems = browser.check(copy).problems()
    finally:
        copy.unlink()
    assert any(p.startswith(expected) for p in problems), problems
