"""``ktm data tree|amazon|commits``: task data as JSONL."""

from pathlib import Path

from .options import nonnegative_int, positive_int, probability


# ---------------------------------------------------------------- commands
def cmd_data(args) -> int:
    from ..tasks.tree import write_stage

    counts = write_stage(args.out, args.stage, args.num_trees, args.seed)
    print(f"wrote {args.out}/train.jsonl ({counts['train']} questions) and "
          f"{args.out}/test.jsonl ({counts['test']} questions), stage {args.stage}, seed {args.seed}")
    return 0


def refuse_overwriting_source(source: Path, out: Path) -> None:
    """``ValueError`` when writing ``out/train.jsonl`` or ``out/test.jsonl`` would replace a file
    that ``source`` (a file, or a folder of ``train`` / ``test`` / ``dev`` .jsonl) is read from."""
    read = [source] if source.is_file() else [source / f"{s}.jsonl" for s in ("train", "test", "dev")]
    read = {p.resolve() for p in read if p.exists()}
    clash = [name for name in ("train.jsonl", "test.jsonl") if (out / name).resolve() in read]
    if clash:
        raise ValueError(f"--out {out} would overwrite the source data it is made from ({out / clash[0]} is read "
                         f"from --source {source}): choose another --out")


def cmd_data_source(args) -> int:
    """``ktm data amazon|commits``: the task's prompt/answer records, both splits, as JSONL.
    ``--source`` is a local folder or file, or a Hugging Face dataset id (one category's or
    language's raw file, split as the paper's release does)."""
    from ..tasks import AmazonTask, CommitsTask, amazon, commits
    from ..tasks.base import write_jsonl
    from ..tasks.hub import is_hub_id

    hub_options = {"category": "--category", "language": "--language", "test_size": "--test-size",
                   "train_fraction": "--train-fraction", "seed": "--seed"}
    given = [flag for dest, flag in hub_options.items() if getattr(args, dest, None) is not None]
    amazon_data = args.dataset == "amazon"
    if is_hub_id(args.source):
        opts = {k: getattr(args, k) for k in hub_options if getattr(args, k, None) is not None}
        if amazon_data:
            splits, note = amazon.hub_reviews(args.source, max_chars=args.review_chars, **opts)
        else:
            splits, report, note = commits.hub_commits(args.source, max_chars=args.commit_chars,
                                                       policy=args.long_commits, **opts)
            note += f"; length policy: {report}"
    else:
        if given:
            raise ValueError(f"{', '.join(given)} apply to a Hugging Face dataset id as --source, and "
                             f"{args.source} is a local path (or no Hub id)")
        refuse_overwriting_source(Path(args.source), Path(args.out))
        task = (AmazonTask(args.source, max_chars=args.review_chars) if amazon_data else
                CommitsTask(args.source, max_chars=args.commit_chars, policy=args.long_commits))
        splits = {split: task.examples(split) for split in ("train", "test")}
        note = f"length policy: {task.report}" if getattr(task, "report", None) else ""
    for split, examples in splits.items():
        write_jsonl(Path(args.out) / f"{split}.jsonl", examples)
    print(f"wrote {args.out}/train.jsonl ({len(splits['train'])} examples) and {args.out}/test.jsonl "
          f"({len(splits['test'])} examples) from {args.source}" + (f"; {note}" if note else ""))
    return 0


# ---------------------------------------------------------------- parser
def add_parser(sub) -> None:
    from ..tasks import amazon, commits

    d = sub.add_parser("data", help="write task data as JSONL")
    dsub = d.add_subparsers(dest="dataset", required=True)
    t = dsub.add_parser("tree", help="a Textualized Tree stage: FOLDER/train.jsonl and FOLDER/test.jsonl")
    t.add_argument("--stage", default="small", help="small, xsmall, medium, xmedium, large or x3large")
    t.add_argument("--num-trees", type=positive_int, default=2000, help="trees to generate (split 98/2 by tree)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="output folder")
    t.set_defaults(func=cmd_data)
    for name, what in (("amazon", "reviews (rating, text, ...)"), ("commits", "commits in CommitPackFT's schema")):
        r = dsub.add_parser(name, help=f"{name} task data from local JSONL {what} or the paper's Hugging Face "
                                       "dataset: FOLDER/train.jsonl and FOLDER/test.jsonl with prompt and answer")
        hub = amazon.HUB_ID if name == "amazon" else commits.HUB_ID
        r.add_argument("--source", required=True, help="a folder with train.jsonl and test.jsonl (or dev.jsonl), "
                                                       f"one .jsonl file (split here), or a Hugging Face dataset "
                                                       f"id such as {hub} (its raw file, split as the release)")
        r.add_argument("--out", required=True, help="output folder")
        hub_help = "Hugging Face source only: "
        if name == "amazon":
            r.add_argument("--review-chars", type=nonnegative_int, default=0,
                           help="cut each review to this many characters (default: 0, whole reviews)")
            r.add_argument("--category", help=hub_help + f"the review category (default: {amazon.CATEGORY})")
            r.add_argument("--test-size", type=positive_int,
                           help=hub_help + f"reviews held out, whole products (default: {amazon.TEST_SIZE})")
            r.add_argument("--train-fraction", type=probability, help=hub_help + "share of the other reviews "
                           f"sampled for training (default: {amazon.TRAIN_FRACTION})")
        else:
            r.add_argument("--commit-chars", type=nonnegative_int, default=6000,
                           help="budget of old + new contents per commit, in characters (0: none)")
            r.add_argument("--long-commits", choices=["skip", "truncate"], default="skip",
                           help="commits over the budget: skip them, or truncate their old contents")
            r.add_argument("--language", help=hub_help + f"the language, lower case (default: {commits.LANGUAGE})")
            r.add_argument("--test-size", type=positive_int,
                           help=hub_help + f"commits held out, whole repositories (default: {commits.TEST_SIZE})")
        r.add_argument("--seed", type=int, help=hub_help + "seed of the split (default: 0)")
        r.set_defaults(func=cmd_data_source)
