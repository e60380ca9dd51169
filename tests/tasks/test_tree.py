"""The Textualized Tree generator: shapes, rendering, questions, splits, files."""

import dataclasses
import doctest
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ktm.tasks.tree as tree_mod
from ktm.tasks.base import majority_rate, read_jsonl
from ktm.tasks.tree import (
    STAGE_ORDER,
    STAGES,
    Stage,
    Tree,
    TreeTask,
    generate_tree,
    make_split,
    parse_tree,
    tree_questions,
    write_stage,
)

SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
SMALL_STAGES = [s for s in STAGE_ORDER if s != "x3large"]


def lines_to_edges(rendered):
    """Independent reading of a rendering: (names, depths, parent-of-each by name)."""
    names, depths, parent = [], [], {}
    for line in rendered.split("\n"):
        m = re.fullmatch(r"(\+*)([A-Z]{2})", line)
        assert m, f"bad line {line!r}"
        depth, name = len(m.group(1)), m.group(2)
        if depth:
            # nearest preceding line with depth - 1
            j = max(i for i, d in enumerate(depths) if d == depth - 1)
            assert all(d >= depth for d in depths[j + 1:])
            parent[name] = names[j]
        names.append(name)
        depths.append(depth)
    return names, depths, parent


def check_bounds(tree, stage):
    n = len(tree)
    assert 2 <= n <= stage.max_nodes
    assert max(tree.depths) <= stage.max_depth
    full = n == stage.max_nodes
    for i, kids in enumerate(tree.children):
        assert len(kids) <= stage.max_children
        if tree.depths[i] == stage.max_depth:
            assert not kids
        elif not full:  # with budget left, no node is cut below the lower bound
            assert len(kids) >= (max(1, stage.min_children) if i == 0 else stage.min_children)
    assert tree.children[0]  # the root always has a child


# --- stages ---------------------------------------------------------------------------


def test_stages_table():
    assert STAGE_ORDER == ["small", "xsmall", "medium", "xmedium", "large", "x3large"]
    assert list(STAGES) == STAGE_ORDER
    got = {k: (s.max_depth, s.max_nodes, s.min_children, s.max_children) for k, s in STAGES.items()}
    assert got == {"small": (2, 3, 0, 2), "xsmall": (3, 5, 0, 2), "medium": (3, 10, 0, 3),
                   "xmedium": (4, 15, 1, 3), "large": (4, 30, 1, 3), "x3large": (4, 150, 3, 5)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        STAGES["small"].max_nodes = 4  # frozen


# --- generation -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(seed=SEEDS, stage=st.sampled_from(SMALL_STAGES))
def test_tree_within_stage_bounds(seed, stage):
    check_bounds(generate_tree(stage, random.Random(seed)), STAGES[stage])


@settings(max_examples=10, deadline=None)
@given(seed=SEEDS)
def test_x3large_within_bounds(seed):
    check_bounds(generate_tree("x3large", random.Random(seed)), STAGES["x3large"])


@settings(max_examples=40, deadline=None)
@given(seed=SEEDS, stage=st.sampled_from(STAGE_ORDER))
def test_names_distinct_two_uppercase_letters(seed, stage):
    tree = generate_tree(stage, random.Random(seed))
    assert len(set(tree.names)) == len(tree.names)
    assert all(re.fullmatch(r"[A-Z]{2}", n) for n in tree.names)
    assert tree.stage == stage


@settings(max_examples=40, deadline=None)
@given(seed=SEEDS, stage=st.sampled_from(STAGE_ORDER))
def test_rendering_agrees_with_edges(seed, stage):
    tree = generate_tree(stage, random.Random(seed))
    assert tree.rendered == tree.render()
    names, depths, parent = lines_to_edges(tree.rendered)
    assert names == list(tree.names)
    assert depths == list(tree.depths)
    assert depths[0] == 0 and all(d > 0 for d in depths[1:])
    assert set(parent.items()) == {(c, p) for p, c in tree.edges}
    assert len(tree.edges) == len(tree) - 1
    assert parse_tree(tree.rendered, stage) == tree


def test_generation_deterministic_and_varied():
    a = [generate_tree("medium", random.Random(5)).rendered for _ in range(3)]
    assert len(set(a)) == 1
    many = {generate_tree("medium", random.Random(s)).rendered for s in range(50)}
    assert len(many) == 50


def test_children_in_creation_order_preorder():
    # the children a node gets are rendered in order, each followed by its own subtree
    tree = generate_tree("large", random.Random(3))
    for i, kids in enumerate(tree.children):
        assert list(kids) == sorted(kids)
        assert all(tree.parents[k] == i for k in kids)


# --- hand-built tree, questions -------------------------------------------------------


def test_exact_prompt_hand_built_tree():
    tree = Tree(("KQ", "BD", "XA", "MM"), (-1, 0, 1, 0), stage="small")
    assert tree.rendered == "KQ\n+BD\n++XA\n+MM"
    assert tree.edges == {("KQ", "BD"), ("BD", "XA"), ("KQ", "MM")}
    qs = tree_questions(tree, tree_id=11)
    assert qs[0].prompt == ("Tree: KQ\n+BD\n++XA\n+MM, Task: Parent/Child Relationship, "
                            "Parent: KQ, Child: BD, Answer: ")
    assert qs[0].answer == "true"
    assert qs[0].meta == {"tree_id": 11, "stage": "small"}
    pairs = [re.search(r"Parent: (\w\w), Child: (\w\w), Answer: $", q.prompt).groups() for q in qs]
    assert pairs == [(p, c) for p in tree.names for c in tree.names if p != c]
    answers = dict(zip(pairs, (q.answer for q in qs)))
    assert answers[("BD", "XA")] == "true"
    assert answers[("KQ", "XA")] == "false"  # grandparent is not a parent
    assert answers[("BD", "KQ")] == "false"  # reversed edge
    assert answers[("BD", "MM")] == "false"  # sibling


@settings(max_examples=40, deadline=None)
@given(seed=SEEDS, stage=st.sampled_from(SMALL_STAGES))
def test_question_counts(seed, stage):
    tree = generate_tree(stage, random.Random(seed))
    qs = tree_questions(tree, 0)
    n = len(tree)
    assert len(qs) == n * (n - 1)
    assert sum(q.answer == "true" for q in qs) == n - 1
    assert {q.answer for q in qs} <= {"true", "false"}
    assert len({q.prompt for q in qs}) == len(qs)
    assert all(q.prompt.endswith("Answer: ") for q in qs)


@pytest.mark.parametrize("names, parents", [
    (("AA", "AA"), (-1, 0)),          # repeated name
    (("AA", "bb"), (-1, 0)),          # not upper case
    (("AA", "BBB"), (-1, 0)),         # not two letters
    (("AA", "BB"), (0, 0)),           # no root
    (("AA", "BB", "CC", "DD"), (-1, 0, 0, 1)),  # not a pre-order
    ((), ()),
])
def test_tree_rejects_bad_input(names, parents):
    with pytest.raises(ValueError):
        Tree(names, parents)


def test_parse_rejects_bad_rendering():
    for text in ["+AA", "AA\n++BB", "AA\nBB"]:
        with pytest.raises(ValueError):
            parse_tree(text)


# --- splits ---------------------------------------------------------------------------


def ids(examples):
    return {e.meta["tree_id"] for e in examples}


def renderings(examples):
    return {e.prompt.split(", Task:")[0] for e in examples}


@pytest.fixture(scope="module")
def small_split():
    return make_split("small", num_trees=2000, seed=0)


def test_split_is_by_tree(small_split):
    train, test = small_split["train"], small_split["test"]
    assert not ids(train) & ids(test)
    assert not renderings(train) & renderings(test)
    assert len(ids(train)) + len(ids(test)) <= 2000
    assert len(ids(test)) == round(0.02 * len(ids(train) | ids(test)))
    assert {e.meta["stage"] for e in train + test} == {"small"}
    # each tree contributes all its questions to one split
    per_tree = {}
    for e in train + test:
        per_tree[e.meta["tree_id"]] = per_tree.get(e.meta["tree_id"], 0) + 1
    assert set(per_tree.values()) <= {2, 6}


def test_split_deterministic_and_seed_dependent(small_split):
    again = make_split("small", num_trees=2000, seed=0)
    assert again == small_split
    assert [e.meta for e in again["test"]] == [e.meta for e in small_split["test"]]
    other = make_split("small", num_trees=2000, seed=1)
    assert ids(other["test"]) != ids(small_split["test"])
    assert renderings(other["test"]) != renderings(small_split["test"])


def test_split_drops_duplicate_trees(monkeypatch):
    fixed = [Tree(("AA", "BB"), (-1, 0)), Tree(("AA", "CC"), (-1, 0)), Tree(("AA", "BB"), (-1, 0))]
    it = iter(fixed)
    monkeypatch.setattr(tree_mod, "generate_tree", lambda stage, rng: next(it))
    s = make_split("small", num_trees=3, seed=0)
    assert ids(s["train"]) | ids(s["test"]) == {0, 1}
    assert len(ids(s["test"])) == 1


def test_split_needs_two_distinct_trees(monkeypatch):
    monkeypatch.setattr(tree_mod, "generate_tree", lambda stage, rng: Tree(("AA", "BB"), (-1, 0)))
    with pytest.raises(ValueError, match="distinct"):
        make_split("small", num_trees=5, seed=0)


def test_small_split_minimum_sizes():
    s = make_split("small", num_trees=2, seed=3)
    assert len(ids(s["train"])) == 1 and len(ids(s["test"])) == 1


def test_majority_false_rate_small(small_split):
    label, rate = majority_rate(small_split["train"] + small_split["test"])
    print(f"\nstage small, 2000 trees: majority {label!r} rate {rate:.4f}")
    assert label == "false"
    assert 0.6 <= rate <= 0.7


# --- task, files ----------------------------------------------------------------------


def test_tree_task():
    task = TreeTask("xsmall", num_trees=100, seed=2)
    assert (task.name, task.metric, task.max_new_tokens) == ("tree", "accuracy", 3)
    assert isinstance(task.stage, Stage) and task.stage is STAGES["xsmall"]
    train = task.examples("train")
    assert train is task.examples("train")  # cached
    assert train == make_split("xsmall", 100, 2)["train"]
    assert not ids(train) & ids(task.examples("test"))
    assert task.labels(train) == ["false", "true"]
    with pytest.raises(ValueError):
        task.examples("validation")


def test_tree_task_rejects_bad_arguments():
    with pytest.raises(ValueError, match="x3large"):  # lists the valid stages
        TreeTask("huge")
    for n in (1, 0, -5, 2.5):
        with pytest.raises(ValueError):
            TreeTask("small", num_trees=n)
    with pytest.raises(ValueError):
        make_split("small", num_trees=1, seed=0)
    with pytest.raises(ValueError):
        make_split("nope", num_trees=10, seed=0)
    with pytest.raises(ValueError):
        TreeTask("small", test_fraction=0)


def test_write_stage_round_trip(tmp_path):
    counts = write_stage(tmp_path, "small", num_trees=200, seed=4)
    expected = make_split("small", 200, 4)
    assert counts == {k: len(v) for k, v in expected.items()}
    for split in ("train", "test"):
        rows = read_jsonl(tmp_path / f"{split}.jsonl")
        assert rows == expected[split]
        assert [r.meta for r in rows] == [e.meta for e in expected[split]]
        assert all(set(r.meta) == {"tree_id", "stage"} for r in rows)


def test_doctests():
    result = doctest.testmod(tree_mod)
    assert result.attempted > 0 and result.failed == 0


def test_name_token_script_finds_the_names_in_tree_and_question(tokenizer):
    from conftest import load_benchmark

    mod = load_benchmark("tree_name_tokens")
    prompt = "Tree: KF\n+UD\n+TD, Task: Parent/Child Relationship, Parent: KF, Child: UD, Answer: "
    pairs = mod.name_token_ids(tokenizer, prompt)  # one token per character
    kf, ud = tuple(tokenizer.convert_tokens_to_ids(list("KF"))), tuple(tokenizer.convert_tokens_to_ids(list("UD")))
    assert pairs == [(kf, kf), (ud, ud)]


@settings(max_examples=40, deadline=None)
@given(seed=SEEDS, stage=st.sampled_from(SMALL_STAGES))
def test_parse_question_inverts_question_prompt(seed, stage):
    from ktm.tasks.tree import parse_question, question_prompt

    tree = tree_mod.generate_tree(stage, random.Random(seed))
    for q in tree_mod.tree_questions(tree, 0)[:6]:
        rendered, parent, child = parse_question(q.prompt)
        assert rendered == tree.rendered and question_prompt(rendered, parent, child) == q.prompt
    with pytest.raises(ValueError, match="not a tree question"):
        parse_question("Review: great shoes, Label: ")
