"""The Textualized Tree benchmark: is node P the direct parent of node C?

A random tree is written one node per line, depth-first (pre-order, children in the
order they were created); a line is ``"+"`` repeated ``depth`` times and then the
node's name, the root having depth 0 (no ``"+"``). Node names are distinct two-letter
upper-case strings (``"AA"`` .. ``"ZZ"``, 676 possible), drawn at random without
replacement for each tree. For example::

    KQ
    +BD
    ++XA
    +MM

Every ordered pair ``(p, c)`` of distinct nodes becomes one question, with the answer
``"true"`` when ``p`` is the direct parent of ``c`` (an edge of the tree) and
``"false"`` otherwise, so a tree of ``n`` nodes gives ``n * (n - 1)`` questions of which
exactly ``n - 1`` are ``"true"``. The prompt is::

    Tree: {rendered}, Task: Parent/Child Relationship, Parent: {p}, Child: {c}, Answer: 

(with a trailing space) and the answer is ``"true"`` or ``"false"``.

Generation algorithm (``generate_tree``), for a :class:`Stage` with ``max_depth``,
``max_nodes``, ``min_children`` and ``max_children``:

1. Start with the root alone, at depth 0.
2. Expand nodes breadth-first (a FIFO queue, starting with the root). A node at depth
   ``< max_depth`` gets a number of children drawn uniformly from
   ``[min_children, max_children]``, cut so that the total number of nodes never
   exceeds ``max_nodes`` (once the budget is spent, later nodes get fewer children or
   none). Nodes at depth ``max_depth`` get no children.
3. Root rule: the root always gets at least one child, so every tree has at least two
   nodes and at least one question. Its count is drawn uniformly from
   ``[max(1, min_children), max_children]`` (then cut to the budget as above).
4. Names are drawn at once for the finished shape, ``rng.sample`` of the 676 names, and
   given to the nodes in rendering order.

Everything is drawn from the one ``random.Random`` passed in, so a seed fixes the trees.

Curriculum stages (``STAGES``, in ``STAGE_ORDER``)::

    name      max_depth  max_nodes  min_children  max_children
    small         2          3           0             2
    xsmall        3          5           0             2
    medium        3         10           0             3
    xmedium       4         15           1             3
    large         4         30           1             3
    x3large       4        150           3             5

Splits are made by tree, never by question (``make_split``): all questions about one
tree land in the same split.

Example:
    >>> import random
    >>> tree = generate_tree("small", random.Random(0))
    >>> len(tree_questions(tree, tree_id=0)) == len(tree) * (len(tree) - 1)
    True
    >>> task = TreeTask("small", num_trees=100, seed=0)
    >>> sorted({e.answer for e in task.examples("train")})
    ['false', 'true']
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from .base import Example, Task, write_jsonl
from .trees import NAMES, STAGE_ORDER, STAGES, Stage, Tree, generate_tree, get_stage, parse_tree

__all__ = [
    "NAMES", "STAGES", "STAGE_ORDER", "parse_question", "SPLITS", "Stage", "Tree", "TreeTask", "get_stage",
    "generate_tree", "parse_tree", "tree_questions", "question_prompt", "make_split",
    "write_stage",
]

SPLITS = ("train", "test")
TRUE, FALSE = "true", "false"


def question_prompt(rendered: str, parent: str, child: str) -> str:
    """The prompt asking whether ``parent`` is the direct parent of ``child``.

    Example:
        >>> question_prompt("AA\\n+BB", "AA", "BB")
        'Tree: AA\\n+BB, Task: Parent/Child Relationship, Parent: AA, Child: BB, Answer: '
    """
    return (f"Tree: {rendered}, Task: Parent/Child Relationship, "
            f"Parent: {parent}, Child: {child}, Answer: ")


_QUESTION = re.compile(r"Tree: (.*), Task: Parent/Child Relationship, Parent: (\S+), Child: (\S+), Answer: ", re.S)


def parse_question(prompt: str) -> tuple[str, str, str]:
    """``(rendered tree, parent, child)`` of a prompt made by :func:`question_prompt`; the
    inverse of that function. Raises ``ValueError`` for any other text.

    Example:
        >>> parse_question(question_prompt("AA\\n+BB", "AA", "BB"))
        ('AA\\n+BB', 'AA', 'BB')
    """
    match = _QUESTION.fullmatch(prompt)
    if match is None:
        raise ValueError(f"not a tree question: {prompt[:60]!r}")
    return match.group(1), match.group(2), match.group(3)


def tree_questions(tree: Tree, tree_id: int) -> list[Example]:
    """All ``n * (n - 1)`` questions about ``tree``: parents in rendering order, then children.

    Example:
        >>> qs = tree_questions(parse_tree("AA\\n+BB"), tree_id=7)
        >>> [(q.answer, q.meta["tree_id"]) for q in qs]
        [('true', 7), ('false', 7)]
    """
    rendered, edges = tree.rendered, tree.edges
    meta = {"tree_id": tree_id, "stage": tree.stage}
    return [Example(question_prompt(rendered, p, c), TRUE if (p, c) in edges else FALSE, dict(meta))
            for p in tree.names for c in tree.names if p != c]


def _unique_trees(stage: Stage, num_trees: int, seed: int) -> dict[int, Tree]:
    """``num_trees`` trees from ``random.Random(seed)``, keyed by generation index, with
    repeated renderings dropped (the first kept)."""
    rng = random.Random(seed)
    trees: dict[int, Tree] = {}
    seen: set[str] = set()
    for i in range(num_trees):
        tree = generate_tree(stage, rng)
        if tree.rendered not in seen:
            seen.add(tree.rendered)
            trees[i] = tree
    return trees


def _check_split_args(num_trees, test_fraction) -> None:
    if isinstance(num_trees, bool) or not isinstance(num_trees, int) or num_trees < 2:
        raise ValueError(f"num_trees must be an integer >= 2 (one tree for each split), "
                         f"got {num_trees!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")


def make_split(stage: str | Stage, num_trees: int, seed: int,
               test_fraction: float = 0.02) -> dict[str, list[Example]]:
    """Train and test questions, split by tree.

    ``num_trees`` trees are generated with ``random.Random(seed)``; duplicates (same
    rendering) are dropped, keeping the first. The remaining tree ids (generation indices)
    are shuffled with a ``Random`` derived from ``seed``; the first
    ``max(1, round(test_fraction * n))`` go to test, the rest to train. Within a split,
    questions are ordered by tree id.

    Example:
        >>> s = make_split("small", num_trees=50, seed=0)
        >>> len({e.meta["tree_id"] for e in s["test"]})
        1
    """
    stage = get_stage(stage)
    _check_split_args(num_trees, test_fraction)
    trees = _unique_trees(stage, num_trees, seed)
    if len(trees) < 2:
        raise ValueError(f"only {len(trees)} distinct tree(s) generated; need >= 2 to split")
    ids = list(trees)
    random.Random(f"ktm-tree-split:{seed}").shuffle(ids)
    n_test = min(len(ids) - 1, max(1, round(test_fraction * len(ids))))
    parts = {"test": sorted(ids[:n_test]), "train": sorted(ids[n_test:])}
    return {split: [q for i in parts[split] for q in tree_questions(trees[i], i)]
            for split in SPLITS}


class TreeTask(Task):
    """The Textualized Tree task at one curriculum stage (accuracy on "true"/"false").

    Args:
        stage: a name in ``STAGE_ORDER``.
        num_trees: trees generated (before dropping duplicates); at least 2.
        seed: fixes the trees and the split.
        test_fraction: share of trees held out for test.

    Example:
        >>> task = TreeTask("small", num_trees=200, seed=0)
        >>> task.stage.max_nodes, task.metric
        (3, 'accuracy')
    """

    name = "tree"
    metric = "accuracy"
    max_new_tokens = 3
    cue_words = 5  # "Parent: AA, Child: BB, Answer:" stays whole when a compressor shortens the tree

    @dataclass(frozen=True)
    class Options:
        stage: tuple[str, ...] = field(default=("small",), metadata={
            "help": "tree stage, or several in order for a curriculum (train)"})
        num_trees: int = field(default=2000, metadata={"help": "trees generated per tree stage"})
        data_seed: int = field(default=0, metadata={"help": "seed of the tree generator"})

    @classmethod
    def from_options(cls, options: "TreeTask.Options") -> list["TreeTask"]:
        return [cls(stage, num_trees=options.num_trees, seed=options.data_seed) for stage in options.stage]

    @property
    def label(self) -> str:
        return f"tree {self.stage.name}"

    def __init__(self, stage: str = "small", num_trees: int = 2000, seed: int = 0,
                 test_fraction: float = 0.02):
        if isinstance(stage, Stage):
            stage = stage.name
        self.stage = get_stage(stage)
        _check_split_args(num_trees, test_fraction)
        self.num_trees, self.seed, self.test_fraction = num_trees, seed, test_fraction
        self._splits: dict[str, list[Example]] | None = None

    def examples(self, split: str) -> list[Example]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if self._splits is None:
            self._splits = make_split(self.stage, self.num_trees, self.seed, self.test_fraction)
        return self._splits[split]


def write_stage(folder: str | Path, stage: str | Stage, num_trees: int, seed: int,
                test_fraction: float = 0.02) -> dict[str, int]:
    """Write ``folder/train.jsonl`` and ``folder/test.jsonl``; return examples per split.

    Each line holds ``prompt``, ``answer``, ``tree_id`` and ``stage``.

    Example:
        >>> import tempfile
        >>> counts = write_stage(tempfile.mkdtemp(), "small", num_trees=100, seed=0)
        >>> sorted(counts)
        ['test', 'train']
    """
    folder = Path(folder)
    splits = make_split(stage, num_trees, seed, test_fraction)
    for split, examples in splits.items():
        write_jsonl(folder / f"{split}.jsonl", examples)
    return {split: len(examples) for split, examples in splits.items()}
