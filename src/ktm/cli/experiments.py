"""``ktm demo`` and ``ktm pareto``: the comparisons ktm runs on itself (``ktm.experiments``)."""

import argparse
from pathlib import Path

from ..arguments import overrides
from .config_file import add_config_arg
from .options import (HelpFormatter, TRUST_HELP, add_base_args, add_task_args, nonnegative_int,
                      positive_float, positive_int)


def cmd_demo(args) -> int:
    from ..experiments.demo import run_amazon_demo, run_demo

    if args.task == "tree":
        run_demo(steps=args.steps, k=args.k, out=args.out or "runs/demo", num_trees=args.num_trees,
                 recipe=args.recipe, eval_examples=args.eval_examples or 200, model=args.model, device=args.device,
                 trust_remote_code=args.trust_remote_code)
    else:
        run_amazon_demo(args.reviews, out=args.out or "runs/demo-amazon", k=args.k, steps=args.steps,
                        eval_examples=args.eval_examples, recipe=args.recipe, model=args.model, device=args.device,
                        trust_remote_code=args.trust_remote_code, from_zoo=not args.from_block_mean)
    return 0


def cmd_pareto(args) -> int:
    from ..experiments.pareto import GridConfig, run_grid
    from ..tasks import TASKS

    cls = TASKS[args.task]
    grid = GridConfig(task=args.task, task_options=overrides(args, cls.Options), recipe=args.recipe,
                      steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every,
                      eval_examples=args.eval_examples, train_examples=args.train_examples, seed=args.seed,
                      model=args.model, dtype=args.dtype, generate_examples=args.generate_examples,
                      lingua_model=args.lingua_model, init_from=dict(args.init_from), lr=args.lr)
    rows = run_grid(grid, args.methods, args.k, args.out, device=args.device, overwrite=args.overwrite,
                    timing_prompts=args.timing_prompts, trust_remote_code=args.trust_remote_code)
    from ..experiments.pareto_report import markdown_table, score_rows

    print(markdown_table(score_rows(rows)))
    print(f"report: {Path(args.out) / 'pareto.md'} (and pareto.json, pareto.csv, pareto.png)")
    return 0


def k_reference(text: str) -> tuple[str, str]:
    """``K=MODEL`` -> ("K", "MODEL"), for ``--init-from``."""
    k, sep, ref = text.partition("=")
    if not sep or not k.isdigit() or int(k) < 2 or not ref:
        raise argparse.ArgumentTypeError(f"expected K=MODEL with K >= 2 (e.g. 4=zoo:default-k4), got {text!r}")
    return str(int(k)), ref


def add_demo_parser(sub) -> None:
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
    dm.add_argument("--from-block-mean", action="store_true",
                    help="amazon: start the merged model from the block mean, not from the pretrained merger that "
                         "ships for K (zoo:default-kK, the default on the embedded model)")
    dm.add_argument("--out", default=None, help="run folder (default: runs/demo-amazon or runs/demo)")
    dm.add_argument("--model", default=None, help="base model (default: embedded SmolLM2-135M-Instruct)")
    dm.add_argument("--device", default="auto")
    dm.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    dm.set_defaults(func=cmd_demo)


def add_pareto_parser(sub) -> None:
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
    pa.add_argument("--lr", type=positive_float, default=None,
                    help="learning rate of every cell, LoRA and encoder (default: the recipe's)")
    pa.add_argument("--init-from", nargs="+", type=k_reference, default=[], metavar="K=MODEL",
                    help="the merge cell at K starts from this saved model (a folder, zoo:NAME or hub id), "
                         "e.g. 4=zoo:default-k4; other cells start as the recipe does")
    pa.add_argument("--seed", type=int, default=0)
    add_config_arg(pa)
    pa.add_argument("--out", required=True, help="grid folder")
    pa.add_argument("--overwrite", action="store_true", help="discard the grid already in OUT and start over")
    add_task_args(pa)
    add_base_args(pa)
    pa.set_defaults(func=cmd_pareto)


def add_parser(sub) -> None:
    add_demo_parser(sub)
    add_pareto_parser(sub)
