"""The run directory: kdlab's on-disk format, and the one way to read it.

* :mod:`~kdlab.runs.rundir`: the layout, the lock, ``status.json``, the stored config;
* :mod:`~kdlab.runs.checkpoint`: checkpoint save/load with one integrity check;
* :mod:`~kdlab.runs.open`: :func:`~kdlab.runs.open.open_run`, a finished or running run's config,
  task and rebuilt models, for every reader (eval, export, latency, the API, reports, sweeps).
"""
