"""Image classification: the task (:mod:`~kdlab.tasks.classification.task`) and its evaluation
(:mod:`~kdlab.tasks.classification.evaluate`)."""
