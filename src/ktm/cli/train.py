"""``ktm train``: one training run on a task (``ktm.train.phases.train_run``)."""

from pathlib import Path

from ..config import ModelConfig, TrainConfig
from ..arguments import add_arguments, overrides
from .config_file import add_config_arg, recorded_args
from .options import HelpFormatter, add_base_args, add_report_arg, add_task_args, positive_int, runtime_from, tasks_from


def cmd_train(args) -> int:
    from tqdm.auto import tqdm

    from ..train.phases import train_run
    from ..train.reporting import plot_curves
    from ..train.recipes import get_recipe

    recipe = get_recipe(args.recipe)
    given = overrides(args, ModelConfig)
    model_cfg = recipe.model_config(**given)
    train_cfg = recipe.train_config(**overrides(args, TrainConfig))
    tasks = tasks_from(args)
    print(f"recipe {recipe.name}: K = {model_cfg.k}, lr {train_cfg.lr}, batch {train_cfg.batch_size}, "
          f"{train_cfg.steps} steps" + (f" per round, curriculum {args.stage}" if len(tasks) > 1 else ""))
    run = train_run(model_cfg, train_cfg, tasks, args.out, runtime=runtime_from(args), resume=args.resume,
                    overwrite=args.overwrite, init_from=args.init_from, init_adapter_from=args.init_adapter_from,
                    given=given, threshold=args.threshold, final_threshold=args.final_threshold,
                    max_rounds=args.max_rounds, record={"recipe": recipe.name, "argv": args.argv,
                                                        "args": recorded_args(args)},
                    log=tqdm.write, report_to=args.report_to)
    last = run.trainer.history[-1]
    print(f"final {last['metric']} {last['value']:.4f}" +
          (f" (majority {last['majority_rate']:.4f})" if "majority_rate" in last else ""))
    curves = plot_curves(run.trainer.history, Path(args.out) / "curves.png") if run.trainer.is_main else None
    print(f"saved {run.path}; history in {Path(args.out) / 'history.json'}" + (f", plot in {curves}" if curves else ""))
    return 0


def add_parser(sub) -> None:
    from ..train.recipes import DEFAULT_RECIPE, RECIPES

    tr = sub.add_parser("train", help="train LoRA + encoder on a task (accelerate launch for multi-GPU)",
                        formatter_class=HelpFormatter)
    tr.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES),
                    help="named settings; explicit options override them (docs/RECIPES.md)")
    add_config_arg(tr)
    tr.add_argument("--out", required=True, help="run folder: checkpoint/, model/, history.json, run_config.json, "
                                                 "curves.png")
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
    add_task_args(tr)
    add_base_args(tr)
    add_report_arg(tr)
    default = RECIPES[DEFAULT_RECIPE]
    for cls, shown in [(ModelConfig, default.model_config()), (TrainConfig, default.train_config())]:
        add_arguments(tr, cls, shown=shown,
                      title=f"{cls.__name__} (defaults shown: recipe {DEFAULT_RECIPE!r}; --recipe changes them)")
    tr.set_defaults(func=cmd_train)
