"""Published numbers (``paper_results.csv``) and how a run is matched to them.

The CSV has the columns ``source,dataset,teacher,student,method,metric,value``: the SDD paper's
Tables 1-8 and the DKD/CRD same-architecture table. It ships inside the package
(``kdlab/report/paper_results.csv``, read with :mod:`importlib.resources`); a report without it
still works, it just has no paper column.

Which statistic a published number is (``paper_statistic``):

* ``best``: the best test accuracy over epochs (the DKD/SDD convention; all SDD-sourced rows and
  the DKD/ReviewKD rows of the DKD README);
* ``last``: the last epoch's test accuracy, for rows that come from the CRD paper (its baselines
  ``student``, ``teacher``, ``kd`` and the feature methods it ran, ``crd`` included). When the same
  cell appears in several sources with the same number (the SDD tables copy the CRD baselines),
  a CRD origin wins: the number was measured the CRD way.
"""

from __future__ import annotations

import csv
import importlib.resources
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

from kdlab.core.errors import ConfigError

__all__ = [
    "COLUMNS", "CRD_METHODS", "PACKAGE_CSV", "PaperTable", "PaperValue", "STATISTIC_TEXT",
    "load_paper_results", "paper_arch", "paper_method", "parse_paper_csv", "row_statistic",
]

log = logging.getLogger(__name__)

PACKAGE_CSV = "paper_results.csv"
COLUMNS = ("source", "dataset", "teacher", "student", "method", "metric", "value")

#: Methods whose CIFAR numbers the CRD paper measured (its table is copied by DKD and SDD).
CRD_METHODS = frozenset({"student", "teacher", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd",
                         "pkt", "ab", "ft", "fsp", "nst", "crd"})

STATISTIC_TEXT = {
    "best": "best test accuracy over epochs (DKD/SDD convention)",
    "last": "last-epoch test accuracy (CRD convention)",
}


def row_statistic(source: str, method: str) -> str:
    """``"last"`` for a CRD-sourced number, ``"best"`` otherwise (see the module docstring)."""
    return "last" if "CRD" in source and method in CRD_METHODS else "best"


@dataclass(frozen=True)
class PaperValue:
    """One published number, possibly reported by several sources."""

    value: float
    sources: tuple[str, ...]
    statistic: str


@dataclass
class PaperTable:
    """Published numbers keyed by (dataset, teacher, student, method, metric)."""

    values: dict[tuple[str, str, str, str, str], PaperValue] = field(default_factory=dict)
    origin: str | None = None

    @property
    def methods(self) -> frozenset[str]:
        """Every method name that appears in the table."""
        return frozenset(k[3] for k in self.values)

    def __len__(self) -> int:
        return len(self.values)

    def lookup(self, dataset: str | None, teacher: str | None, student: str | None,
               method: str | None, metric: str = "top1") -> PaperValue | None:
        """The published number of one cell, or None when the paper does not have it.

        A run without a teacher (``kdlab train``) matches the ``student`` rows of its
        architecture under any teacher (or, for method ``teacher``, the ``teacher`` rows where
        it is the teacher) when all those rows agree on the number.
        """
        if not (dataset and student and method):
            return None
        teacher = paper_arch(teacher) if teacher else teacher
        student = paper_arch(student)
        if teacher:
            return self.values.get((dataset, teacher, student, method, metric))
        if method == "teacher":
            found = [v for k, v in sorted(self.values.items())
                     if k[0] == dataset and k[1] == student and k[3:] == (method, metric)]
        elif method == "student":
            found = [v for k, v in sorted(self.values.items())
                     if k[0] == dataset and k[2] == student and k[3:] == (method, metric)]
        else:
            return None
        if not found or any(abs(v.value - found[0].value) > 1e-9 for v in found):
            return None
        sources = tuple(dict.fromkeys(s for v in found for s in v.sources))
        stat = "last" if any(v.statistic == "last" for v in found) else "best"
        return PaperValue(found[0].value, sources, stat)


#: kdlab's ImageNet model names -> the names the papers' tables use.
_IMAGENET_PAPER_NAMES = {"resnet18": "ResNet18", "resnet34": "ResNet34", "resnet50": "ResNet50"}


def paper_arch(arch: str) -> str:
    """The architecture name the papers' tables use for a kdlab model name.

    kdlab registers the ImageNet and CUB-200 variants with a suffix (``resnet34_imagenet``,
    ``resnet32x4_cub``) because the CIFAR zoo owns the plain names; the tables do not.
    """
    for suffix in ("_imagenet", "_cub"):
        if arch.endswith(suffix):
            base = arch[: -len(suffix)]
            return _IMAGENET_PAPER_NAMES.get(base, base)
    return arch


def parse_paper_csv(text: str, origin: str = "paper_results.csv") -> PaperTable:
    """Parse the CSV text; a missing column or a non-numeric value is a :class:`ConfigError`."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ConfigError(f"{origin}: missing column(s) {', '.join(missing)}; "
                          f"expected {','.join(COLUMNS)}")
    table = PaperTable(origin=origin)
    for line, row in enumerate(reader, start=2):
        key = (row["dataset"].strip(), row["teacher"].strip(), row["student"].strip(),
               row["method"].strip(), row["metric"].strip())
        try:
            value = float(row["value"])
        except (TypeError, ValueError):
            raise ConfigError(f"{origin} line {line}: value {row['value']!r} is not a number"
                              ) from None
        source = row["source"].strip()
        stat = row_statistic(source, key[3])
        old = table.values.get(key)
        if old is None:
            table.values[key] = PaperValue(value, (source,), stat)
            continue
        if abs(old.value - value) > 1e-9:
            log.warning("%s line %d: %s is %.2f here but %.2f in %s; keeping the first",
                        origin, line, "/".join(key), value, old.value, old.sources[0])
            continue
        stat = "last" if "last" in (old.statistic, stat) else "best"
        sources = old.sources if source in old.sources else (*old.sources, source)
        table.values[key] = PaperValue(old.value, sources, stat)
    return table


def load_paper_results(path: str | Path | None = None) -> PaperTable:
    """The published numbers: from ``path``, else the copy shipped in the package.

    An explicit ``path`` that does not exist is an error; a package without its CSV gives an
    empty table (the report then has no paper column values) and a log message.
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"paper results file not found: {p}")
        return parse_paper_csv(p.read_text(encoding="utf-8"), str(p))
    try:
        resource = importlib.resources.files("kdlab.report").joinpath(PACKAGE_CSV)
        text = resource.read_text(encoding="utf-8")
    except (FileNotFoundError, OSError, ModuleNotFoundError):
        log.warning("the package has no %s: the report shows no published numbers "
                    "(pass --paper CSV to use one)", PACKAGE_CSV)
        return PaperTable(origin=None)
    return parse_paper_csv(text, f"kdlab/report/{PACKAGE_CSV}")


def paper_method(config_name: str | None, display_method: str | None,
                 known_methods: frozenset[str]) -> str | None:
    """The CSV method name a run corresponds to.

    The first segment of the config ``name`` (``sd_kd_M12/resnet32x4_resnet8x4`` ->
    ``sd_kd_M12``) when it is a method of the CSV (the ablation configs are named that way),
    else the method display name (``kd``, ``dckd+fitnet``); ``vanilla`` maps to ``student``.
    """
    first = (config_name or "").split("/", 1)[0]
    if first and first in known_methods:
        return first
    if display_method == "vanilla":
        return "student"
    return display_method
