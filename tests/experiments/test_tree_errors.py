"""benchmarks/tree_errors.py: relations of the asked nodes, and a run on a tiny saved model."""

import json

import pytest

from ktm.tasks import TreeTask

@pytest.fixture(scope="module")
def mod():
    from conftest import load_benchmark

    return load_benchmark("tree_errors")


@pytest.mark.parametrize("stage", ["small", "medium"])
def test_relation_parent_is_exactly_the_true_answers(mod, stage):
    seen = set()
    for e in TreeTask(stage, num_trees=100, seed=1).examples("train"):
        rel = mod.question_relation(e.prompt)
        assert (rel == "parent") == (e.answer == "true"), e.prompt
        seen.add(rel)
    # every relation occurs in trees of depth 3 with several children
    assert seen == set(mod.RELATIONS) if stage == "medium" else seen <= set(mod.RELATIONS)


def test_relation_is_an_inverse_pair(mod):
    parents = (-1, 0, 1, 1, 0, 4)
    inverse = {"parent": "child", "child": "parent", "grandparent": "grandchild",
               "grandchild": "grandparent", "sibling": "sibling", "other": "other"}
    for p in range(len(parents)):
        for c in range(len(parents)):
            if p != c:
                assert mod.relation(parents, c, p) == inverse[mod.relation(parents, p, c)]


def test_by_relation_and_table(mod):
    task = TreeTask("small", num_trees=40)
    rows = [{"prompt": e.prompt, "answer": e.answer, "prediction": " false"} for e in task.examples("train")[:30]]
    res = mod.by_relation(rows, task.normalise)
    assert res["parent"]["accuracy"] == 0.0
    assert all(v["accuracy"] == 1.0 for rel, v in res.items() if rel != "parent")
    assert sum(v["n"] for v in res.values()) == 30
    text = mod.table({"always false": res})
    assert "| parent (true) |" in text and text.splitlines()[-1].startswith("| all | 30 |")


def test_question_relation_rejects_other_prompts(mod):
    with pytest.raises(ValueError, match="not a tree question"):
        mod.question_relation("Review: great, Label:")


def test_runs_on_a_saved_model(mod, tmp_path, tokenizer, capsys):
    from conftest import tiny_llama

    from ktm import KTokenMerging

    base = tmp_path / "base"
    tiny_llama(len(tokenizer), max_position_embeddings=512).save_pretrained(base)
    tokenizer.save_pretrained(base)
    KTokenMerging.from_base(str(base), k=2, device="cpu", dtype="float32").save_pretrained(tmp_path / "m")
    mod.main([f"{tmp_path / 'm'}=tiny", "--num-trees", "100", "--examples", "6", "--out", str(tmp_path / "e")])
    assert "| all | 6 |" in capsys.readouterr().out
    data = json.loads((tmp_path / "e.json").read_text())
    assert sum(v["n"] for v in data["results"]["tiny"].values()) == 6
    assert (tmp_path / "e.md").read_text().startswith("`python benchmarks/tree_errors.py")
