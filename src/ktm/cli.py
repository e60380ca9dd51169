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
import json
import sys
from pathlib import Path

from .config import ModelConfig, TrainConfig, add_arguments, overrides, save_json, to_dict


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default once: skipped where the help already names it or it is unset."""

    def _get_help_string(self, action):
        if "(default" in (action.help or "") or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


# ---------------------------------------------------------------- shared options
def _add_task_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task")
    g.add_argument("--task", choices=["tree", "jsonl"], default="tree", help="task (default: tree)")
    g.add_argument("--stage", default=["small"], nargs="+",
                   help="tree stage, or several in order for a curriculum (train)")
    g.add_argument("--num-trees", type=int, default=2000, help="trees generated per tree stage (default: 2000)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the tree generator (default: 0)")
    g.add_argument("--data", help="jsonl task: folder with train.jsonl and test.jsonl")
    g.add_argument("--metric", choices=["accuracy", "perplexity"], default="accuracy",
                   help="jsonl task: how answers are scored (default: accuracy)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="jsonl accuracy task: tokens generated per answer (default: 8)")


def _add_base_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("base model")
    g.add_argument("--model", default=None,
                   help="base model: hub id, folder, .gguf file (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (bf16 on GPU; default: auto)")


def _tasks(args) -> list:
    from .tasks import JsonlTask, TreeTask

    if args.task == "jsonl":
        if not args.data:
            raise SystemExit("ktm: --task jsonl needs --data FOLDER (with train.jsonl / test.jsonl)")
        return [JsonlTask(args.data, metric=args.metric, max_new_tokens=args.max_new_tokens or 8)]
    return [TreeTask(s, num_trees=args.num_trees, seed=args.data_seed) for s in args.stage]


def _fmt_result(res: dict) -> str:
    lines = []
    if res["metric"] == "accuracy":
        lines.append(f"accuracy        {res['value']:.4f}  ({res['n']} examples)")
        lines.append(f"majority class  {res['majority_rate']:.4f}  (always {res['majority_label']!r})")
    else:
        lines.append(f"perplexity      {res['value']:.4f}  ({res['answer_tokens']} answer tokens)")
    lines.append(f"prompt length   {res['prompt_tokens']:.1f} tokens -> {res['merged_length']:.1f} "
                 f"merged embeddings (K = {res['k']}, {1 - res['merged_length'] / res['prompt_tokens']:.0%} shorter)")
    return "\n".join(lines)


# ---------------------------------------------------------------- commands
def cmd_data(args) -> int:
    from .tasks.tree import write_stage

    counts = write_stage(args.out, args.stage, args.num_trees, args.seed)
    print(f"wrote {args.out}/train.jsonl ({counts['train']} questions) and "
          f"{args.out}/test.jsonl ({counts['test']} questions), stage {args.stage}, seed {args.seed}")
    return 0


def build_model(args, model_cfg: ModelConfig, grow_from: str | None = None):
    from .model import KTokenMerging

    if getattr(args, "init_from", None):
        m = KTokenMerging.from_pretrained(args.init_from, base=args.model, device=args.device, dtype=args.dtype)
        if m.k != model_cfg.k:
            raise SystemExit(f"ktm: --init-from {args.init_from} is for K = {m.k}, not K = {model_cfg.k}")
        return m
    m = KTokenMerging.from_base(args.model, device=args.device, dtype=args.dtype,
                                seed=args.seed if args.seed is not None else 0, **vars(model_cfg))
    if getattr(args, "init_adapter_from", None):
        m.load_trained(args.init_adapter_from, adapter_only=True)
    if grow_from:
        m.grow_from(grow_from)
    return m


def cmd_train(args) -> int:
    from .recipes import get_recipe
    from tqdm.auto import tqdm

    from .trainer import CHECKPOINT_DIR, Trainer, clear_output, prepare_phases, train_curriculum

    recipe = get_recipe(args.recipe)
    model_cfg = recipe.model_config(**overrides(args, ModelConfig))
    train_cfg = recipe.train_config(**overrides(args, TrainConfig))
    out = Path(args.out)
    if not args.resume and (out / CHECKPOINT_DIR).exists():
        if not args.overwrite:
            raise SystemExit(f"ktm: {out} already holds a checkpoint: pass --resume to continue it, "
                             f"or --overwrite to start over")
        clear_output(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = _tasks(args)
    model_cfg, train_cfg = prepare_phases(tasks, out, model_cfg, train_cfg, args.model, device=args.device,
                                          dtype=args.dtype, log=tqdm.write)
    save_json(out / "run_config.json", {"recipe": recipe.name, "model": to_dict(model_cfg),
                                        "train": to_dict(train_cfg), "argv": sys.argv[1:]})
    model = build_model(args, model_cfg, train_cfg.grow_from)
    trainer = Trainer(model, train_cfg, output_dir=out)
    if args.resume and not trainer.resume():
        print(f"no checkpoint in {out}; starting from scratch")
    print(f"recipe {recipe.name}: K = {model_cfg.k}, lr {train_cfg.lr}, batch {train_cfg.batch_size}, "
          f"{train_cfg.steps} steps" + (f" per round, curriculum {args.stage}" if len(tasks) > 1 else ""))
    if len(tasks) > 1:
        thresholds = [args.threshold] * (len(tasks) - 1) + [args.final_threshold]
        train_curriculum(trainer, list(zip(tasks, thresholds)), train_cfg.steps, args.max_rounds)
    else:
        trainer.fit(tasks[0])
    path = trainer.save_final()
    last = trainer.history[-1]
    print(f"final {last['metric']} {last['value']:.4f}" +
          (f" (majority {last['majority_rate']:.4f})" if "majority_rate" in last else ""))
    print(f"saved {path}; history in {out / 'history.json'}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate
    from .model import KTokenMerging

    model = KTokenMerging.from_pretrained(args.checkpoint, base=args.model, device=args.device, dtype=args.dtype)
    results = []
    for task in _tasks(args):
        res = evaluate(model, task, split=args.split, max_examples=args.max_examples,
                       batch_size=args.batch_size, keep_predictions=args.show)
        print(f"== {task.name} ({getattr(task, 'stage', None) and task.stage.name or args.split})")
        print(_fmt_result(res))
        for p in res.get("predictions", [])[: args.show]:
            print(f"  {p['prompt'][-60:]!r} -> {p['prediction']!r} (reference {p['answer']!r})")
        results.append(res)
    if args.json:
        save_json(args.json, {"results": results})
    return 0


def cmd_generate(args) -> int:
    import torch

    from .model import KTokenMerging

    if args.checkpoint:
        model = KTokenMerging.from_pretrained(args.checkpoint, base=args.model, device=args.device, dtype=args.dtype)
    else:
        model = KTokenMerging.from_base(args.model, k=args.k, device=args.device, dtype=args.dtype)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    gen = torch.Generator(device=model.device).manual_seed(args.seed) if args.sample else None
    outs = model.generate(prompts, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=gen)
    for p, o in zip(prompts, outs):
        if args.json:
            print(json.dumps({"prompt": p, "output": o, "merged_length": model.compressed_length(p)}))
        else:
            print(o)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(steps=args.steps, k=args.k, out=args.out, num_trees=args.num_trees, recipe=args.recipe,
             eval_examples=args.eval_examples, model=args.model, device=args.device)
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from . import __version__, bench
    from .recipes import DEFAULT_RECIPE, RECIPES

    p = argparse.ArgumentParser(prog="ktm", description="K-Token Merging: latent-space prompt compression.")
    p.add_argument("--version", action="version", version=f"ktm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="write task data as JSONL")
    dsub = d.add_subparsers(dest="dataset", required=True)
    t = dsub.add_parser("tree", help="a Textualized Tree stage: FOLDER/train.jsonl and FOLDER/test.jsonl")
    t.add_argument("--stage", default="small", help="small, xsmall, medium, xmedium, large or x3large")
    t.add_argument("--num-trees", type=int, default=2000, help="trees to generate (split 98/2 by tree)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="output folder")
    t.set_defaults(func=cmd_data)

    tr = sub.add_parser("train", help="train LoRA + encoder on a task (accelerate launch for multi-GPU)",
                        formatter_class=HelpFormatter)
    tr.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES),
                    help="named settings; explicit options override them (docs/RECIPES.md)")
    tr.add_argument("--out", required=True, help="run folder: checkpoint/, model/, history.json")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="discard a checkpoint already in OUT")
    tr.add_argument("--init-from", help="start from a saved ktm model folder")
    tr.add_argument("--init-adapter-from",
                    help="start the LoRA adapter from a saved ktm model of any K (e.g. a K = 1 model "
                         "trained on the task); the encoder starts fresh")
    tr.add_argument("--threshold", type=float, default=0.85, help="curriculum: pass mark of each stage")
    tr.add_argument("--final-threshold", type=float, default=0.95, help="curriculum: pass mark of the last stage")
    tr.add_argument("--max-rounds", type=int, default=3, help="curriculum: most rounds per stage")
    _add_task_args(tr)
    _add_base_args(tr)
    default = RECIPES[DEFAULT_RECIPE]
    for cls, shown in [(ModelConfig, default.model_config()), (TrainConfig, default.train_config())]:
        add_arguments(tr, cls, shown=shown,
                      title=f"{cls.__name__} (defaults shown: recipe {DEFAULT_RECIPE!r}; --recipe changes them)")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="score a saved model on a task's held-out split")
    ev.add_argument("--checkpoint", required=True, help="a folder written by ktm train (OUT/model)")
    ev.add_argument("--split", default="test")
    ev.add_argument("--max-examples", type=int, default=0, help="evaluate a fixed random subset (0: all)")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--show", type=int, default=5, help="print this many predictions")
    ev.add_argument("--json", help="also write the numbers to this JSON file")
    _add_task_args(ev)
    _add_base_args(ev)
    ev.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="answer prompts (arguments, or one per line on stdin)")
    g.add_argument("prompt", nargs="*")
    g.add_argument("--checkpoint", help="a saved ktm model folder (default: an untrained model)")
    g.add_argument("--k", type=int, default=4, help="K for an untrained model")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    _add_base_args(g)
    g.set_defaults(func=cmd_generate)

    dm = sub.add_parser("demo", help="end to end on the embedded model: data, train K=4, eval, timing",
                        formatter_class=HelpFormatter)
    dm.add_argument("--k", type=int, default=4)
    dm.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's budget)")
    dm.add_argument("--num-trees", type=int, default=2000)
    dm.add_argument("--eval-examples", type=int, default=200)
    dm.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES))
    dm.add_argument("--out", default="runs/demo", help="run folder")
    dm.add_argument("--model", default=None, help="base model (default: embedded SmolLM2-135M-Instruct)")
    dm.add_argument("--device", default="auto")
    dm.set_defaults(func=cmd_demo)

    bench.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"ktm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
