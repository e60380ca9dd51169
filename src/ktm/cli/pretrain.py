"""``ktm pretrain``: a task-agnostic merger trained on plain text (``ktm.train.pretrain``)."""

from ..config import ModelConfig, TrainConfig
from ..arguments import add_arguments, overrides
from .config_file import add_config_arg, recorded_args
from .options import HelpFormatter, add_base_args, add_report_arg


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
                                   record={"argv": args.argv, "args": recorded_args(args)},
                                   trust_remote_code=args.trust_remote_code, report_to=args.report_to)
    last = run.trainer.history[-1]
    print(f"held-out continuation perplexity {last['value']:.4f} reading merged prompts (K = {model_cfg.k}); "
          f"{references['plain_perplexity']:.4f} for the base model reading them plain, "
          f"{references['no_context_perplexity']:.4f} reading no prompt at all")
    print(f"saved {run.path}; start a task from it with: ktm train --init-from {run.path} --k {model_cfg.k} ...")
    return 0


def add_parser(sub) -> None:
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
    add_config_arg(pt)
    pt.add_argument("--out", required=True, help="run folder: checkpoint/, model/, history.json, pretrain.json")
    pt.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    pt.add_argument("--overwrite", action="store_true", help="discard a checkpoint already in OUT")
    add_arguments(pt, TextOptions, title="text")
    add_base_args(pt)
    add_report_arg(pt)
    model_cfg, train_cfg = pretrain_configs()
    for cls, shown in [(ModelConfig, model_cfg), (TrainConfig, train_cfg)]:
        add_arguments(pt, cls, shown=shown,
                      title=f"{cls.__name__} (defaults shown: recipe {DEFAULT_RECIPE!r} + pretraining)")
    pt.set_defaults(func=cmd_pretrain)
