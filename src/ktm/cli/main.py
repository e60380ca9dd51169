"""The ``ktm`` command line: a dict of plain functions, one per sub-command.

    ktm data tree --stage small --num-trees 2000 --seed 0 --out data/small
    ktm train --task tree --stage small --k 4 --steps 200 --out runs/k4
    ktm eval --checkpoint runs/k4/model --task tree --stage small
    ktm generate --checkpoint runs/k4/model "Tree: ..., Answer: "
    ktm demo
    ktm bench speed
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import sys
from pathlib import Path

from ..config import ModelConfig, TrainConfig, add_arguments, overrides, save_json


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default once: skipped where the help already names it or it is unset."""

    def _get_help_string(self, action):
        if "(default" in (action.help or "") or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


# ---------------------------------------------------------------- argument types
def int_at_least(low: int):
    """argparse type: an integer >= ``low`` (a one-line argparse error otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _number(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def probability(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = _number(text)
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


positive_int, nonnegative_int = int_at_least(1), int_at_least(0)

TRUST_HELP = ("let transformers run Python code shipped with the model folder, checkpoint or hub "
              "repository (an auto_map in its config). That code runs with your permissions: "
              "use it only for models you trust (default: never run it)")


# ---------------------------------------------------------------- shared options
def _add_task_args(p: argparse.ArgumentParser) -> None:
    """``--task`` and every task's own options (``Task.Options``), one group per task."""
    from ..tasks import TASKS

    p.add_argument_group("task").add_argument("--task", choices=sorted(TASKS), default="tree",
                                              help="task (default: tree)")
    for name, cls in TASKS.items():
        add_arguments(p, cls.Options, title=f"{name} task")


def _add_base_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("base model")
    g.add_argument("--model", default=None,
                   help="base model: hub id, folder, .gguf file (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (bf16 on GPU; default: auto)")
    g.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)


def _tasks(args) -> list:
    """The task(s) the options name: one, or several in order for a curriculum."""
    from ..tasks import TASKS

    cls = TASKS[args.task]
    return cls.from_options(cls.Options(**overrides(args, cls.Options)))


def _fmt_result(res: dict) -> str:
    lines = []
    if res["metric"] == "accuracy":
        lines.append(f"accuracy        {res['value']:.4f}  ({res['n']} examples)")
        lines.append(f"majority class  {res['majority_rate']:.4f}  (always {res['majority_label']!r})")
    else:
        lines.append(f"perplexity      {res['value']:.4f}  ({res['answer_tokens']} answer tokens)")
        if res.get("generated"):
            lines.append(f"exact match     {res['exact_match']:.4f}  ({res['generated']} generated, greedy)")
            lines.append(f"chrF            {res['chrf']:.2f}")
    lines.append(f"prompt length   {res['prompt_tokens']:.1f} tokens -> {res['merged_length']:.1f} "
                 f"merged embeddings (K = {res['k']}, {1 - res['merged_length'] / res['prompt_tokens']:.0%} shorter)")
    return "\n".join(lines)


# ---------------------------------------------------------------- commands
def cmd_data(args) -> int:
    from ..tasks.tree import write_stage

    counts = write_stage(args.out, args.stage, args.num_trees, args.seed)
    print(f"wrote {args.out}/train.jsonl ({counts['train']} questions) and "
          f"{args.out}/test.jsonl ({counts['test']} questions), stage {args.stage}, seed {args.seed}")
    return 0


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
        task = (AmazonTask(args.source, max_chars=args.review_chars) if amazon_data else
                CommitsTask(args.source, max_chars=args.commit_chars, policy=args.long_commits))
        splits = {split: task.examples(split) for split in ("train", "test")}
        note = f"length policy: {task.report}" if getattr(task, "report", None) else ""
    for split, examples in splits.items():
        write_jsonl(Path(args.out) / f"{split}.jsonl", examples)
    print(f"wrote {args.out}/train.jsonl ({len(splits['train'])} examples) and {args.out}/test.jsonl "
          f"({len(splits['test'])} examples) from {args.source}" + (f"; {note}" if note else ""))
    return 0


def cmd_train(args) -> int:
    from tqdm.auto import tqdm

    from ..train.phases import train_run
    from ..train.recipes import get_recipe

    recipe = get_recipe(args.recipe)
    model_cfg = recipe.model_config(**overrides(args, ModelConfig))
    train_cfg = recipe.train_config(**overrides(args, TrainConfig))
    tasks = _tasks(args)
    if args.init_from:
        from ..train.phases import check_init_options

        check_init_options(args.init_from, overrides(args, ModelConfig))
    print(f"recipe {recipe.name}: K = {model_cfg.k}, lr {train_cfg.lr}, batch {train_cfg.batch_size}, "
          f"{train_cfg.steps} steps" + (f" per round, curriculum {args.stage}" if len(tasks) > 1 else ""))
    thresholds = [args.threshold] * (len(tasks) - 1) + [args.final_threshold]
    run = train_run(model_cfg, train_cfg, tasks, args.out, base=args.model, device=args.device, dtype=args.dtype,
                    resume=args.resume, overwrite=args.overwrite, init_from=args.init_from,
                    init_adapter_from=args.init_adapter_from, thresholds=thresholds, max_rounds=args.max_rounds,
                    record={"recipe": recipe.name, "argv": args.argv}, log=tqdm.write,
                    trust_remote_code=getattr(args, "trust_remote_code", None))
    last = run.trainer.history[-1]
    print(f"final {last['metric']} {last['value']:.4f}" +
          (f" (majority {last['majority_rate']:.4f})" if "majority_rate" in last else ""))
    print(f"saved {run.path}; history in {Path(args.out) / 'history.json'}")
    return 0


def cmd_pretrain(args) -> int:
    from tqdm.auto import tqdm

    from ..train.pretrain import pretrain_configs, pretrain_run
    from ..tasks.text import TextOptions

    text = TextOptions(**overrides(args, TextOptions))
    if not text.text:
        raise ValueError("give the text to pretrain on: --text FILE_OR_FOLDER [...]")
    model_cfg, train_cfg = pretrain_configs(args.recipe, overrides(args, ModelConfig), overrides(args, TrainConfig))
    print(f"pretrain: K = {model_cfg.k}, context layers {model_cfg.context_layers}, lr {train_cfg.lr}, batch "
          f"{train_cfg.batch_size}, {train_cfg.steps} steps, windows of {text.prompt_tokens} + "
          f"{text.continuation_tokens} tokens")
    run, references = pretrain_run(model_cfg, train_cfg, text, args.out, base=args.model, device=args.device,
                                   dtype=args.dtype, resume=args.resume, overwrite=args.overwrite, log=tqdm.write,
                                   record={"argv": args.argv},
                                   trust_remote_code=getattr(args, "trust_remote_code", None))
    last = run.trainer.history[-1]
    print(f"held-out continuation perplexity {last['value']:.4f} reading merged prompts (K = {model_cfg.k}); "
          f"{references['plain_perplexity']:.4f} for the base model reading them plain, "
          f"{references['no_context_perplexity']:.4f} reading no prompt at all")
    print(f"saved {run.path}; start a task from it with: ktm train --init-from {run.path} --k {model_cfg.k} ...")
    return 0


def cmd_zoo_list(args) -> int:
    from .. import checkpoint
    from ..train.zoo import describe_shipped

    rows = describe_shipped()
    if not rows:
        print(f"no mergers ship in {checkpoint.MERGERS_DIR}; build one with: ktm zoo build NAME --out RUN")
        return 0
    for r in rows:
        held, dt = r["held_out"], r["weights_dtype"]
        ppl = ""
        if f"merged_perplexity_{dt}" in held:
            ppl = (f"merged {held[f'merged_perplexity_{dt}']:.2f} ({dt}; float32 "
                   f"{held.get('merged_perplexity_float32', float('nan')):.2f}), plain prompt "
                   f"{held.get('plain_perplexity', float('nan')):.2f}, no prompt "
                   f"{held.get('no_prompt_perplexity', float('nan')):.2f} ({held.get('windows', '?')} windows)")
        print(f"zoo:{r['name']}  K = {r['k']}, base {r['base']!r}, {r['weights_dtype']}, "
              f"{r['bytes'] / 2**20:.1f} MiB")
        if r["summary"]:
            print(f"  {r['summary']}")
        if ppl:
            print(f"  held-out continuation perplexity: {ppl}")
        if r["command"]:
            print(f"  rebuilt by: {r['command']}")
        print(f"  start a task from it: ktm train --init-from zoo:{r['name']} --k {r['k']} ...")
    return 0


def cmd_zoo_build(args) -> int:
    from tqdm.auto import tqdm

    from ..train.zoo import build

    command = f"ktm zoo build {args.name} --out {args.out}"
    folder, card = build(args.name, args.out, into=args.into, text=args.text, base=args.model, device=args.device,
                         dtype=args.dtype, resume=args.resume, overwrite=args.overwrite, log=tqdm.write,
                         command=command)
    print(f"wrote {folder} ({card['bytes'] / 2**20:.1f} MiB); use it as --init-from zoo:{args.name} "
          f"(or --init-from {folder})")
    return 0


def cmd_eval(args) -> int:
    from ..train.evaluate import evaluate
    from ..model import KTokenMerging

    model = KTokenMerging.from_pretrained(args.checkpoint, base=args.model, device=args.device, dtype=args.dtype,
                                          trust_remote_code=args.trust_remote_code)
    results = []
    for task in _tasks(args):
        res = evaluate(model, task, split=args.split, max_examples=args.max_examples,
                       batch_size=args.batch_size, keep_predictions=args.show,
                       generate_examples=args.generate_examples)
        print(f"== {task.label} ({args.split})")
        print(_fmt_result(res))
        for p in res.get("predictions", [])[: args.show]:
            print(f"  {p['prompt'][-60:]!r} -> {p['prediction']!r} (reference {p['answer']!r})")
        results.append(res)
    if args.json:
        save_json(args.json, {"results": results})
    return 0


#: text-mode escapes of ``ktm generate``: every character that would end a line (for
#: ``str.splitlines``) and the backslash, so that each answer stays on its own line
_LINE_ESCAPES = {ord("\\"): "\\\\", ord("\n"): "\\n", ord("\r"): "\\r",
                 **{ord(c): f"\\x{ord(c):02x}" for c in "\x0b\x0c\x1c\x1d\x1e\x85"},
                 **{ord(c): f"\\u{ord(c):04x}" for c in "\u2028\u2029"}}


def escape_line(text: str) -> str:
    """``text`` on one line: a backslash becomes ``\\\\``, a newline ``\\n``, a carriage return
    ``\\r``, and the other line-breaking characters ``\\xNN`` / ``\\uNNNN`` (Python's escapes)."""
    return text.translate(_LINE_ESCAPES)


def _generate_inputs(args):
    """(where, prompt) pairs: the prompt arguments, else stdin's lines as they arrive (each
    without its line ending); ``where`` names it in error messages."""
    if args.prompt:
        for i, p in enumerate(args.prompt, 1):
            yield f"prompt argument {i}", p
        return
    for n, line in enumerate(sys.stdin, 1):
        yield f"input line {n}", line.removesuffix("\n").removesuffix("\r")


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def cmd_generate(args) -> int:
    import re

    import torch

    from ..checkpoint import read_config
    from ..model import KTokenMerging, PromptError, check_sampling

    check_sampling(args.sample, args.temperature, args.top_k, args.top_p)
    if args.checkpoint:
        saved_k = read_config(args.checkpoint)["model"].get("k")
        if args.k is not None and args.k != saved_k:
            raise ValueError(f"--k {args.k} does not match --checkpoint {args.checkpoint}, which was trained "
                             f"for K = {saved_k} (the checkpoint fixes K): leave --k out")
        model = KTokenMerging.from_pretrained(args.checkpoint, base=args.model, device=args.device, dtype=args.dtype,
                                              trust_remote_code=args.trust_remote_code)
    else:
        model = KTokenMerging.from_base(args.model, k=args.k or 4, device=args.device, dtype=args.dtype,
                                        trust_remote_code=args.trust_remote_code)
    gen = torch.Generator(device=model.device).manual_seed(args.seed) if args.sample else None
    # one output line per input line, in order, written batch by batch as the input arrives
    for batch in _batches(_generate_inputs(args), args.batch_size):
        todo = [item for item in batch if item[1].strip()]  # a blank prompt gets an empty answer
        try:
            outs = model.generate([p for _, p in todo], max_new_tokens=args.max_new_tokens,
                                  do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, generator=gen) if todo else []
        except PromptError as e:  # name the input line, not the batch row
            raise ValueError(f"{todo[e.index][0]}: the prompt {e.detail} (the answers of the batches "
                             f"before it were written; shorten or leave out that prompt)") from e
        answers = iter(outs)
        for _, p in batch:
            o = next(answers) if p.strip() else ""
            if args.json:
                print(json.dumps({"prompt": p, "output": o,
                                  "merged_length": model.compressed_length(p) if p.strip() else 0}))
            else:
                print(escape_line(o))
        sys.stdout.flush()
    return 0


def cmd_demo(args) -> int:
    from ..experiments.demo import run_amazon_demo, run_demo

    if args.task == "tree":
        run_demo(steps=args.steps, k=args.k, out=args.out or "runs/demo", num_trees=args.num_trees,
                 recipe=args.recipe, eval_examples=args.eval_examples or 200, model=args.model, device=args.device)
    else:
        run_amazon_demo(args.reviews, out=args.out or "runs/demo-amazon", k=args.k, steps=args.steps,
                        eval_examples=args.eval_examples, recipe=args.recipe, model=args.model, device=args.device)
    return 0


def cmd_pareto(args) -> int:
    from ..experiments.pareto import GridConfig, run_grid
    from ..tasks import TASKS

    cls = TASKS[args.task]
    grid = GridConfig(task=args.task, task_options=overrides(args, cls.Options), recipe=args.recipe,
                      steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every,
                      eval_examples=args.eval_examples, train_examples=args.train_examples, seed=args.seed,
                      model=args.model, dtype=args.dtype, generate_examples=args.generate_examples,
                      lingua_model=args.lingua_model)
    rows = run_grid(grid, args.methods, args.k, args.out, device=args.device, overwrite=args.overwrite,
                    timing_prompts=args.timing_prompts)
    from ..experiments.pareto_report import markdown_table, score_rows

    print(markdown_table(score_rows(rows)))
    print(f"report: {Path(args.out) / 'pareto.md'} (and pareto.json, pareto.csv, pareto.png)")
    return 0


# ---------------------------------------------------------------- parser
def _add_data_parser(sub) -> None:
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


def _add_train_parser(sub) -> None:
    from ..train.recipes import DEFAULT_RECIPE, RECIPES

    tr = sub.add_parser("train", help="train LoRA + encoder on a task (accelerate launch for multi-GPU)",
                        formatter_class=HelpFormatter)
    tr.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES),
                    help="named settings; explicit options override them (docs/RECIPES.md)")
    tr.add_argument("--out", required=True, help="run folder: checkpoint/, model/, history.json")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="discard a checkpoint already in OUT")
    tr.add_argument("--init-from", help="start from a saved ktm model folder, or a shipped merger "
                                        "zoo:NAME (ktm zoo list)")
    tr.add_argument("--init-adapter-from",
                    help="start the LoRA adapter from a saved ktm model of any K (e.g. a K = 1 model "
                         "trained on the task); the encoder starts fresh")
    tr.add_argument("--threshold", type=float, default=0.85, help="curriculum: pass mark of each stage")
    tr.add_argument("--final-threshold", type=float, default=0.95, help="curriculum: pass mark of the last stage")
    tr.add_argument("--max-rounds", type=positive_int, default=3, help="curriculum: most rounds per stage")
    _add_task_args(tr)
    _add_base_args(tr)
    default = RECIPES[DEFAULT_RECIPE]
    for cls, shown in [(ModelConfig, default.model_config()), (TrainConfig, default.train_config())]:
        add_arguments(tr, cls, shown=shown,
                      title=f"{cls.__name__} (defaults shown: recipe {DEFAULT_RECIPE!r}; --recipe changes them)")
    tr.set_defaults(func=cmd_train)


def _add_pretrain_parser(sub) -> None:
    from ..train.pretrain import pretrain_configs
    from ..train.recipes import DEFAULT_RECIPE, RECIPES
    from ..tasks.text import TextOptions

    pt = sub.add_parser(
        "pretrain", help="a task-agnostic merger for a base model and K, trained on plain text",
        formatter_class=HelpFormatter,
        description="Cut each text into windows of a prompt (read merged) and its continuation, and train "
                    "LoRA + encoder so that the model continues the text as the base model reading the plain "
                    "prompt would (distillation of its next-token distributions, --distill-answer; "
                    "--task-loss adds the continuation's cross-entropy). OUT/model starts a task with "
                    "ktm train --init-from OUT/model. See ktm.train.pretrain and ktm.tasks.text.")
    pt.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES),
                    help="model and optimiser settings, before pretraining's own (docs/RECIPES.md)")
    pt.add_argument("--out", required=True, help="run folder: checkpoint/, model/, history.json, pretrain.json")
    pt.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    pt.add_argument("--overwrite", action="store_true", help="discard a checkpoint already in OUT")
    add_arguments(pt, TextOptions, title="text")
    _add_base_args(pt)
    model_cfg, train_cfg = pretrain_configs()
    for cls, shown in [(ModelConfig, model_cfg), (TrainConfig, train_cfg)]:
        add_arguments(pt, cls, shown=shown,
                      title=f"{cls.__name__} (defaults shown: recipe {DEFAULT_RECIPE!r} + pretraining)")
    pt.set_defaults(func=cmd_pretrain)


def _add_zoo_parser(sub) -> None:
    from ..train.zoo import ZOO

    z = sub.add_parser("zoo", help="pretrained mergers that ship with ktm (zoo:NAME): list them, or rebuild one")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zl = zsub.add_parser("list", help="the shipped mergers, their size and held-out numbers")
    zl.set_defaults(func=cmd_zoo_list)
    zb = zsub.add_parser(
        "build", help="rebuild a shipped merger: ktm pretrain with its recorded settings, then a bf16 copy",
        description="Pretrain with the settings recorded for NAME (ktm.train.zoo.ZOO; resumable with --resume), "
                    "write the slim bfloat16 copy into the package's mergers/NAME (or --into DIR/NAME) with its "
                    "card zoo.json, and measure the held-out continuation perplexity of both copies.")
    zb.add_argument("name", choices=sorted(ZOO), help="the merger to build")
    zb.add_argument("--out", required=True, help="run folder of the pretraining (checkpoint/, model/, ...)")
    zb.add_argument("--into", default=None, help="write DIR/NAME instead of the package's own mergers folder")
    zb.add_argument("--text", nargs="+", default=None,
                    help="pretraining text instead of the recorded ../shared/data train files (same settings)")
    zb.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    zb.add_argument("--overwrite", action="store_true", help="discard a checkpoint already in OUT")
    zb.add_argument("--model", default=None, help="base model (default: the one recorded, the embedded SmolLM2)")
    zb.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    zb.add_argument("--dtype", default="float32", help="training dtype (default: float32, as recorded)")
    zb.set_defaults(func=cmd_zoo_build)


def _add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="score a saved model on a task's held-out split")
    ev.add_argument("--checkpoint", required=True, help="a folder written by ktm train (OUT/model)")
    ev.add_argument("--split", default="test")
    ev.add_argument("--max-examples", type=nonnegative_int, default=0, help="evaluate a fixed random subset (0: all)")
    ev.add_argument("--batch-size", type=positive_int, default=32)
    ev.add_argument("--show", type=nonnegative_int, default=5, help="print this many predictions")
    ev.add_argument("--generate-examples", type=nonnegative_int, default=0,
                    help="perplexity tasks: also generate (greedy) the answers of a fixed subset of this many "
                         "evaluated examples, scored by exact match and chrF (0: none)")
    ev.add_argument("--json", help="also write the numbers to this JSON file")
    _add_task_args(ev)
    _add_base_args(ev)
    ev.set_defaults(func=cmd_eval)


def _add_generate_parser(sub) -> None:
    g = sub.add_parser(
        "generate", help="answer prompts (arguments, or one per line on stdin)",
        description="Answer each prompt: the prompt arguments, or else each line of stdin. Exactly one "
                    "output line per prompt, in order: a blank prompt (empty or only whitespace) is not "
                    "run and gets an empty line. In text mode an answer's backslashes are written as "
                    "\\\\, its newlines as \\n, its carriage returns as \\r and other line-breaking "
                    "characters as \\xNN or \\uNNNN, so every answer stays on one line; --json writes one "
                    "JSON object per line instead. stdin is answered in batches of --batch-size lines as "
                    "they arrive, and each batch's answers are flushed before the next is read. A prompt "
                    "the model rejects (too long) ends the command with an error naming its line; the "
                    "answers before its batch have been written.")
    g.add_argument("prompt", nargs="*", help="prompts to answer (default: one per line of stdin)")
    g.add_argument("--batch-size", type=positive_int, default=16,
                   help="prompts answered together; a batch of stdin lines is answered once it is full "
                        "or stdin ends (use 1 to answer each line as soon as it is typed; default: 16)")
    g.add_argument("--checkpoint", help="a saved ktm model folder (default: an untrained model)")
    g.add_argument("--k", type=positive_int, default=None,
                   help="K for an untrained model (default: 4); with --checkpoint it must be the checkpoint's K")
    g.add_argument("--max-new-tokens", type=positive_int, default=32)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature (needs --sample)")
    g.add_argument("--top-k", type=positive_int, default=None, help="sample from the K likeliest tokens (needs --sample)")
    g.add_argument("--top-p", type=probability, default=None,
                   help="nucleus sampling: the likeliest tokens up to this probability, in (0, 1] (needs --sample)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    _add_base_args(g)
    g.set_defaults(func=cmd_generate)


def _add_demo_parser(sub) -> None:
    from ..train.recipes import DEFAULT_RECIPE, RECIPES

    dm = sub.add_parser(
        "demo", help="end to end on the embedded model: is merging worth it on real reviews?",
        formatter_class=HelpFormatter,
        description="amazon (default): trains plain K = 1, K-Token Merging at K and keep-first at K (the same "
                    "kept fraction) on real Amazon reviews and prints accuracy, macro-F1, length reduction, "
                    "prefill speedup and a verdict (10-13 minutes on 2 CPU cores; a rerun reuses finished "
                    "runs). tree: trains K on the Textualized Tree task (stage small).")
    dm.add_argument("--task", choices=["amazon", "tree"], default="amazon", help="which demo")
    dm.add_argument("--k", type=positive_int, default=4)
    dm.add_argument("--steps", type=positive_int, default=None,
                    help="training steps per run (default: the demo's budget, 60 for amazon, 250 for tree)")
    dm.add_argument("--reviews", default=None,
                    help="amazon: folder with train.jsonl and test.jsonl of reviews (default: ../shared/data/amazon)")
    dm.add_argument("--num-trees", type=positive_int, default=2000, help="tree: trees to generate")
    dm.add_argument("--eval-examples", type=positive_int, default=None,
                    help="held-out examples scored (default: 200)")
    dm.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES))
    dm.add_argument("--out", default=None, help="run folder (default: runs/demo-amazon or runs/demo)")
    dm.add_argument("--model", default=None, help="base model (default: embedded SmolLM2-135M-Instruct)")
    dm.add_argument("--device", default="auto")
    dm.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    dm.set_defaults(func=cmd_demo)


def _add_pareto_parser(sub) -> None:
    from ..experiments.pareto import METHODS
    from ..train.recipes import DEFAULT_RECIPE, RECIPES

    pa = sub.add_parser(
        "pareto", help="train and score every method at every K on one task; table, plot and Pareto frontier",
        formatter_class=HelpFormatter,
        description="Each cell (a method at a K) is a training run with the same recipe, LoRA, budget and "
                    "evaluator, in OUT/cells/<cell>/run. Finished cells are reused and an interrupted cell "
                    "resumes, so rerunning the same command continues the grid. plain (K = 1) is always "
                    "run: it is the reference of the normalised performance and of P-LF1. Writes "
                    "OUT/pareto.{json,csv,md,png} after every cell.")
    pa.add_argument("--methods", nargs="+", choices=METHODS, default=["plain", "merge", "mean", "keep-first", "stride"],
                    metavar="METHOD", help=f"methods to compare, from {', '.join(METHODS)}")
    pa.add_argument("--k", nargs="+", type=positive_int, default=[2, 4, 8], help="block sizes (kept fraction 1/K)")
    pa.add_argument("--steps", type=positive_int, default=60, help="training steps per cell")
    pa.add_argument("--batch-size", type=positive_int, default=8, help="examples per step")
    pa.add_argument("--eval-every", type=nonnegative_int, default=0, help="also evaluate every N steps (0: at the end)")
    pa.add_argument("--eval-examples", type=nonnegative_int, default=200,
                    help="test examples scored per cell, a fixed random subset (0: all)")
    pa.add_argument("--train-examples", type=nonnegative_int, default=0,
                    help="train on a fixed random subset of this many examples (0: all)")
    pa.add_argument("--generate-examples", type=nonnegative_int, default=0,
                    help="perplexity tasks: also generate this many answers greedily, scored by exact match and chrF")
    pa.add_argument("--timing-prompts", type=positive_int, default=16, help="test prompts in the timed prefill batch")
    pa.add_argument("--lingua-model", default=None,
                    help="llmlingua2: the LLMLingua-2 token classifier (hub id or folder; default: "
                         "microsoft/llmlingua-2-xlm-roberta-large-meetingbank)")
    pa.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES), help="training settings of every cell")
    pa.add_argument("--seed", type=int, default=0)
    pa.add_argument("--out", required=True, help="grid folder")
    pa.add_argument("--overwrite", action="store_true", help="discard the grid already in OUT and start over")
    _add_task_args(pa)
    _add_base_args(pa)
    pa.set_defaults(func=cmd_pareto)


# ---------------------------------------------------------------- serving (ktm.serve.export, ktm.serve.serving)
def cmd_export(args) -> int:
    from ..serve.export import export_model

    out = export_model(args.checkpoint, args.out, overwrite=args.overwrite, dtype=args.dtype, base=args.model,
                       trust_remote_code=args.trust_remote_code)
    print(f"exported {args.checkpoint} to {out} (LoRA merged, {args.dtype}); serve it with: ktm serve --export {out}")
    return 0


def cmd_encode(args) -> int:
    from ..checkpoint import CONFIG_NAME
    from ..serve.export import SERVING_CONFIG
    from ..model import KTokenMerging, PromptError
    from ..serve.serving import PromptEncoder, encode_prompts, save_embeds

    folder = Path(args.checkpoint)
    if (folder / SERVING_CONFIG).is_file():
        model = PromptEncoder.from_export(folder, device=args.device, trust_remote_code=args.trust_remote_code)
    elif not (folder / CONFIG_NAME).is_file():
        raise ValueError(f"{folder} is neither an export folder ({SERVING_CONFIG}, written by ktm export) nor a "
                         f"saved ktm model folder ({CONFIG_NAME})" if folder.is_dir() else f"no folder {folder}")
    else:
        model = KTokenMerging.from_pretrained(folder, base=args.model, device=args.device, dtype=args.dtype,
                                              trust_remote_code=args.trust_remote_code).eval()
    tensors = []
    for where, prompt in _generate_inputs(args):
        try:
            tensors.extend(encode_prompts(model, [prompt]))
        except PromptError as e:  # name the argument or input line, not "prompt 0"
            raise ValueError(f"{where}: {e.detail}") from e
    if not tensors:
        raise ValueError("no prompts to encode: give them as arguments or one per line on stdin")
    save_embeds(args.out, tensors, {"format": "ktm-prompt-embeds", "k": model.k, "source": folder.resolve()})
    lengths = [t.shape[0] for t in tensors]
    print(f"wrote {len(tensors)} prompt embeddings to {args.out} (tensors '0' to '{len(tensors) - 1}', "
          f"{min(lengths)}-{max(lengths)} positions x {tensors[0].shape[1]}, float32, K = {model.k})")
    return 0


def cmd_serve(args) -> int:
    import shlex
    import subprocess

    from ..serve.serving import serve_command, vllm_executable

    cmd = serve_command(args.export, max_model_len=args.max_model_len, name=args.name, host=args.host,
                        port=args.port, extra=args.vllm_args)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    cmd[0] = vllm_executable()
    print(f"ktm: running {shlex.join(cmd)}", file=sys.stderr, flush=True)
    try:
        return subprocess.run(cmd).returncode
    except KeyboardInterrupt:
        return 130


def _add_serving_parsers(sub) -> None:
    ex = sub.add_parser(
        "export", help="a trained model as a plain Hugging Face model folder for serving (LoRA merged)",
        description="Write OUT: the checkpoint's LLM with its LoRA merged into the weights (loadable by "
                    "AutoModelForCausalLM, vLLM and others), its tokenizer, the merge encoder "
                    "(ktm_encoder.safetensors) and ktm_serving.json (K and how prompts are merged). See "
                    "docs/SERVING.md.")
    ex.add_argument("--checkpoint", required=True, help="a saved ktm model folder (e.g. OUT/model of ktm train)")
    ex.add_argument("--out", required=True, help="the export folder to write")
    ex.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    ex.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="dtype of the saved weights (the LoRA is merged in float32; default: float32)")
    ex.add_argument("--model", default=None, help="the base model, when not the one saved in the checkpoint")
    ex.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    ex.set_defaults(func=cmd_export)

    en = sub.add_parser(
        "encode", help="prompts -> merged prompt embeddings (a safetensors file) for a prompt-embeds server",
        description="Write one float32 tensor per prompt, named 0, 1, ... in input order, each of shape "
                    "(merged length, hidden size): what merge_prompts gives for that prompt alone. Prompts "
                    "are the arguments, or else the lines of stdin.")
    en.add_argument("prompt", nargs="*", help="prompts (default: one per line of stdin)")
    en.add_argument("--checkpoint", required=True,
                    help="an export folder (ktm export: only the tokenizer, embedding table and encoder are "
                         "loaded) or a saved ktm model folder (loads the whole model)")
    en.add_argument("--out", required=True, help="the .safetensors file to write")
    en.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    en.add_argument("--dtype", default="float32", help="a saved ktm model's dtype (default: float32)")
    en.add_argument("--model", default=None, help="a saved ktm model's base model, when not the saved one")
    en.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    en.set_defaults(func=cmd_encode)

    sv = sub.add_parser(
        "serve", help="start vLLM's OpenAI-compatible server on an export folder (needs vLLM: ktm[serve])",
        usage="ktm serve --export DIR [options] [-- VLLM_SERVE_OPTIONS ...]",
        description="Runs `vllm serve DIR --enable-prompt-embeds ...`; options after -- go to vllm serve. "
                    "Prompt embeddings are for trusted clients: the server listens on 127.0.0.1 unless --host "
                    "says otherwise. See docs/SERVING.md.")
    sv.add_argument("--export", required=True, help="a folder written by ktm export")
    sv.add_argument("--name", default=None, help="the served model name (default: the folder's name)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=positive_int, default=8000)
    sv.add_argument("--max-model-len", type=positive_int, default=None,
                    help="most positions per sequence, merged prompt + answer (default: the model's)")
    sv.add_argument("--dry-run", action="store_true", help="print the vllm serve command instead of running it")
    sv.add_argument("vllm_args", nargs="*", metavar="VLLM_SERVE_OPTIONS", help="after --: more vllm serve options")
    sv.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    """The ``ktm`` parser: one sub-command per ``_add_*_parser``, plus ``bench``."""
    from .. import __version__
    from ..experiments import bench

    p = argparse.ArgumentParser(prog="ktm", description="K-Token Merging: latent-space prompt compression.")
    p.add_argument("--version", action="version", version=f"ktm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_data_parser, _add_train_parser, _add_pretrain_parser, _add_zoo_parser, _add_eval_parser,
                _add_generate_parser, _add_demo_parser, _add_pareto_parser, _add_serving_parsers):
        add(sub)
    bench.register(sub)
    return p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def user_error(e: BaseException) -> str | None:
    """The one-line message for an exception caused by the user's input or machine (a path,
    a permission, a full disk, a bad checkpoint or value), or None for anything else: a bug,
    whose traceback must stay visible."""
    from safetensors import SafetensorError

    from ..checkpoint import CheckpointError

    where = getattr(e, "filename", None)
    if isinstance(e, CheckpointError):
        return (f"{_one_line(e)} (--checkpoint must be a folder written by ktm train, e.g. OUT/model, "
                f"used with the base model it was trained on)")
    if isinstance(e, (ValueError, FileNotFoundError)):
        return _one_line(e)
    if isinstance(e, PermissionError):
        return (f"permission denied: {where or _one_line(e)}: choose a file or folder you can write to "
                f"(e.g. another --out) or read from, or change its permissions")
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return (f"no space left on the device{f' writing {where}' if where else ''}: free some space, "
                f"or write to another disk (e.g. another --out)")
    if isinstance(e, OSError):
        return f"{_one_line(e)} (check the paths and model names given)"
    if isinstance(e, SafetensorError):
        return (f"a .safetensors file could not be read or written ({_one_line(e)}): it is corrupt or "
                f"incomplete; re-save or re-train the checkpoint, or check the disk")
    return None


@contextlib.contextmanager
def _remote_code_allowed(allowed: bool):
    """With ``--trust-remote-code``, models loaded anywhere in the command (teacher and growth
    phases, the demo) may run code shipped with them: KTM_TRUST_REMOTE_CODE=1 meanwhile."""
    from ..loading import TRUST_REMOTE_CODE_ENV

    if not allowed:
        yield
        return
    before = os.environ.get(TRUST_REMOTE_CODE_ENV)
    os.environ[TRUST_REMOTE_CODE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TRUST_REMOTE_CODE_ENV, None)
        else:
            os.environ[TRUST_REMOTE_CODE_ENV] = before


def main(argv: list[str] | None = None) -> int:
    """Run the ``ktm`` command line; returns the exit status.

    Mistakes in the arguments, paths, permissions, disk space or checkpoints end with one
    line ``ktm: error: ...`` on stderr and status 2 (argparse's own errors also return 2);
    any other exception is a bug and propagates with its traceback.
    """
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what run_config.json records
    except SystemExit as e:  # argparse: --help / --version exit 0, bad arguments exit 2
        if e.code in (0, None):
            raise
        return e.code if isinstance(e.code, int) else 2
    try:
        with _remote_code_allowed(getattr(args, "trust_remote_code", False)):
            return args.func(args) or 0
    except Exception as e:
        message = user_error(e)
        if message is None:
            raise
        print(f"ktm: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
