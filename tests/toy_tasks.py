"""Tasks small enough for a tiny random model to learn in seconds, shared by tests in several
folders (``tests/`` is on ``sys.path`` through its ``conftest.py``, so ``from toy_tasks import
LastChar`` works whichever subset of the tests is run)."""

import random

from ktm.tasks.base import Example, Task


class LastChar(Task):
    """Answer the last letter of a random string: learnable by a tiny model in seconds."""

    name = "lastchar"
    max_new_tokens = 1

    def examples(self, split):
        r = random.Random(0 if split == "train" else 1)
        out = []
        for _ in range(200):
            s = "".join(r.choice("abcd") for _ in range(r.randint(3, 9)))
            out.append(Example(f"seq {s} ends with", s[-1]))
        return out
