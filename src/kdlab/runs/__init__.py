"""The run directory: kdlab's on-disk format, and the one way to read it.

* :mod:`~kdlab.runs.rundir`: the layout, status, metrics and the stored config (start, resume,
  extend or refuse), and :func:`~kdlab.runs.rundir.find_run_dirs`;
* :mod:`~kdlab.runs.lock`: one process at a time in a run directory (``lock.json``);
* :mod:`~kdlab.runs.checkpoint`: atomic checkpoint save/load (the integrity check is
  :func:`kdlab.core.weights_file.read_verified`, the one every reader uses);
* :mod:`~kdlab.runs.open`: :func:`~kdlab.runs.open.open_run`, a run's config, task,
  checkpoints and rebuilt models for every reader (eval, export, latency, the API).
"""
