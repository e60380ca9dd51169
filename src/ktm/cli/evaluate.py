"""``ktm eval``: score a saved model on a task's held-out split (``ktm.train.evaluate``)."""

from ..config import save_json
from .options import add_base_args, add_task_args, nonnegative_int, positive_int, tasks_from


def format_result(res: dict) -> str:
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


def cmd_eval(args) -> int:
    from ..train.evaluate import evaluate
    from ..model import KTokenMerging

    model = KTokenMerging.from_pretrained(args.checkpoint, base=args.model, device=args.device, dtype=args.dtype,
                                          trust_remote_code=args.trust_remote_code)
    results = []
    for task in tasks_from(args):
        res = evaluate(model, task, split=args.split, max_examples=args.max_examples,
                       batch_size=args.batch_size, keep_predictions=args.show,
                       generate_examples=args.generate_examples)
        print(f"== {task.label} ({args.split})")
        print(format_result(res))
        for p in res.get("predictions", [])[: args.show]:
            print(f"  {p['prompt'][-60:]!r} -> {p['prediction']!r} (reference {p['answer']!r})")
        results.append(res)
    if args.json:
        save_json(args.json, {"results": results})
    return 0


def add_parser(sub) -> None:
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
    add_task_args(ev)
    add_base_args(ev)
    ev.set_defaults(func=cmd_eval)
