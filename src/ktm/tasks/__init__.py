"""Tasks: each says how its examples load and how they are scored (see ``base.Task``).

``TASKS`` maps a name to its class; ``ktm train --task NAME`` and ``ktm eval`` use it, with
the task's own options (``Task.Options``) as flags. Adding a task is one module and one
entry here.
"""

from .amazon import AmazonTask
from .base import Example, Task, majority_rate, read_jsonl, write_jsonl
from .commits import CommitsTask
from .jsonl import JsonlTask
from .tree import STAGE_ORDER, STAGES, TreeTask

TASKS = {"tree": TreeTask, "jsonl": JsonlTask, "amazon": AmazonTask, "commits": CommitsTask}

__all__ = ["Example", "Task", "TASKS", "TreeTask", "JsonlTask", "AmazonTask", "CommitsTask", "STAGES", "STAGE_ORDER",
           "majority_rate", "read_jsonl", "write_jsonl"]
