"""kdlab's version (one place: the package, run records and exported artefacts read it)."""

__version__ = "0.3.0"
