"""Task types (classification first; detection next): see :mod:`kdlab.tasks.base`."""

from kdlab.tasks.base import Task, TrainMeter, get_task, list_tasks, register_task, task_for

__all__ = ["Task", "TrainMeter", "get_task", "list_tasks", "register_task", "task_for"]
