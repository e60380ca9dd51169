"""The trees of the Textualized Tree task (:mod:`ktm.tasks.tree`): curriculum stages, random
trees within a stage's bounds, their rendering and parsing."""

from __future__ import annotations

import random
import re
import string
from collections import deque
from dataclasses import dataclass
from functools import cached_property
from itertools import product


#: every possible node name, "AA" .. "ZZ" (676)
NAMES: tuple[str, ...] = tuple(a + b for a, b in product(string.ascii_uppercase, repeat=2))


_NAME_RE = re.compile(r"[A-Z]{2}")


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: the bounds trees are generated within.

    Example:
        >>> Stage("tiny", max_depth=1, max_nodes=3, min_children=1, max_children=2).max_nodes
        3
    """

    name: str
    max_depth: int
    max_nodes: int
    min_children: int
    max_children: int

    def __post_init__(self):
        if self.max_depth < 1:
            raise ValueError(f"stage {self.name!r}: max_depth must be >= 1, got {self.max_depth}")
        if not 2 <= self.max_nodes <= len(NAMES):
            raise ValueError(f"stage {self.name!r}: max_nodes must be in [2, {len(NAMES)}], "
                             f"got {self.max_nodes}")
        if not 0 <= self.min_children <= self.max_children or self.max_children < 1:
            raise ValueError(f"stage {self.name!r}: need 0 <= min_children <= max_children and "
                             f"max_children >= 1, got {self.min_children}, {self.max_children}")


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("small", 2, 3, 0, 2),
    Stage("xsmall", 3, 5, 0, 2),
    Stage("medium", 3, 10, 0, 3),
    Stage("xmedium", 4, 15, 1, 3),
    Stage("large", 4, 30, 1, 3),
    Stage("x3large", 4, 150, 3, 5),
)}


STAGE_ORDER: list[str] = list(STAGES)


def get_stage(stage: str | Stage) -> Stage:
    """The :class:`Stage` named ``stage`` (a ``Stage`` is returned as is).

    Example:
        >>> get_stage("medium").max_nodes
        10
    """
    if isinstance(stage, Stage):
        return stage
    try:
        return STAGES[stage]
    except (KeyError, TypeError):
        raise ValueError(f"unknown tree stage {stage!r}; valid stages: {', '.join(STAGE_ORDER)}") \
            from None


@dataclass(frozen=True)
class Tree:
    """A tree in rendering (pre-order) order.

    ``names[i]`` is the i-th rendered node and ``parents[i]`` the index of its parent
    (``-1`` for the root, which is node 0). Construction checks that the names are
    distinct two-letter upper-case strings and that the order is a valid pre-order.

    Example:
        >>> t = Tree(("AB", "CD", "EF", "GH"), (-1, 0, 1, 0))
        >>> print(t.rendered)
        AB
        +CD
        ++EF
        +GH
        >>> sorted(t.edges)
        [('AB', 'CD'), ('AB', 'GH'), ('CD', 'EF')]
    """

    names: tuple[str, ...]
    parents: tuple[int, ...]
    stage: str = "custom"

    def __post_init__(self):
        names, parents = tuple(self.names), tuple(self.parents)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "parents", parents)
        if not names or len(names) != len(parents):
            raise ValueError("a tree needs at least one node and one parent entry per node")
        bad = [n for n in names if not isinstance(n, str) or not _NAME_RE.fullmatch(n)]
        if bad:
            raise ValueError(f"node names must be two upper-case letters, got {bad[:5]}")
        if len(set(names)) != len(names):
            raise ValueError("node names must be distinct")
        if parents[0] != -1:
            raise ValueError("node 0 must be the root (parent -1)")
        path = [0]  # the root-to-previous-node path; a pre-order parent must lie on it
        for i, p in enumerate(parents[1:], 1):
            while path and path[-1] != p:
                path.pop()
            if not path:
                raise ValueError(f"parents are not a pre-order: node {i} ({names[i]}) has parent "
                                 f"{p}, which is not an ancestor of (or) the previous node")
            path.append(i)

    def __len__(self) -> int:
        return len(self.names)

    @cached_property
    def depths(self) -> tuple[int, ...]:
        """Depth of each node (root 0)."""
        depths: list[int] = []
        for p in self.parents:
            depths.append(0 if p < 0 else depths[p] + 1)
        return tuple(depths)

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """Indices of each node's children, in rendering order."""
        kids: list[list[int]] = [[] for _ in self.names]
        for i, p in enumerate(self.parents):
            if p >= 0:
                kids[p].append(i)
        return tuple(tuple(k) for k in kids)

    @cached_property
    def edges(self) -> frozenset[tuple[str, str]]:
        """The ``(parent_name, child_name)`` pairs."""
        names = self.names
        return frozenset((names[p], names[i]) for i, p in enumerate(self.parents) if p >= 0)

    def render(self) -> str:
        """One line per node, ``"+" * depth + name``, joined with newlines."""
        return "\n".join("+" * d + n for d, n in zip(self.depths, self.names))

    @cached_property
    def rendered(self) -> str:
        """``render()``, computed once."""
        return self.render()


def parse_tree(text: str, stage: str = "custom") -> Tree:
    """The :class:`Tree` a rendering describes (the inverse of ``Tree.render``).

    A line's depth is its number of leading ``"+"``; its parent is the nearest preceding
    line one level shallower.

    Example:
        >>> parse_tree("AA\\n+BB\\n+CC").parents
        (-1, 0, 0)
    """
    names: list[str] = []
    parents: list[int] = []
    path: list[int] = []  # path[d] = index of the latest node at depth d
    for n, line in enumerate(text.split("\n"), 1):
        name = line.lstrip("+")
        depth = len(line) - len(name)
        if depth > len(path) or (n == 1) != (depth == 0):
            raise ValueError(f"line {n} ({line!r}): depth {depth} does not follow the lines above")
        del path[depth:]
        parents.append(path[-1] if path else -1)
        path.append(len(names))
        names.append(name)
    return Tree(tuple(names), tuple(parents), stage)


def _shape(stage: Stage, rng: random.Random) -> list[list[int]]:
    """The shape: for each node in creation (breadth-first) order, its children's indices."""
    children: list[list[int]] = [[]]
    depth = [0]
    queue = deque([0])
    while queue:
        node = queue.popleft()
        if depth[node] >= stage.max_depth:
            continue
        low = max(1, stage.min_children) if node == 0 else stage.min_children
        k = min(rng.randint(low, stage.max_children), stage.max_nodes - len(depth))
        for _ in range(k):
            child = len(depth)
            depth.append(depth[node] + 1)
            children.append([])
            children[node].append(child)
            queue.append(child)
    return children


def _preorder(children: list[list[int]]) -> tuple[list[int], list[int]]:
    """Pre-order of a shape given as children lists: (order, parent of each, in that order)."""
    order: list[int] = []
    parents: list[int] = []
    position: dict[int, int] = {}
    stack = [(0, -1)]
    while stack:
        node, parent_pos = stack.pop()
        position[node] = len(order)
        order.append(node)
        parents.append(parent_pos)
        stack.extend((c, position[node]) for c in reversed(children[node]))
    return order, parents


def generate_tree(stage: str | Stage, rng: random.Random) -> Tree:
    """A random tree within ``stage``'s bounds (see the module docstring).

    Example:
        >>> t = generate_tree("xsmall", random.Random(1))
        >>> 2 <= len(t) <= 5 and max(t.depths) <= 3
        True
    """
    stage = get_stage(stage)
    _, parents = _preorder(_shape(stage, rng))
    names = rng.sample(NAMES, len(parents))
    return Tree(tuple(names), tuple(parents), stage.name)
