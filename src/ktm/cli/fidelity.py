"""``ktm fidelity``: the merged model against the plain base model on held-out prose (``ktm.train.fidelity``)."""

import json
from pathlib import Path

from ..arguments import add_arguments, overrides
from .options import HelpFormatter, add_base_args


def cmd_fidelity(args) -> int:
    from ..model import KTokenMerging
    from ..tasks.amazon import read_reviews
    from ..train.fidelity import FidelityOptions, fidelity, fidelity_line, prose_windows

    opts = FidelityOptions(**overrides(args, FidelityOptions))
    model = KTokenMerging.from_pretrained(args.checkpoint, base=args.model, device=args.device, dtype=args.dtype,
                                          trust_remote_code=args.trust_remote_code)
    windows = prose_windows(args.text, model.tokenizer, opts.prompt_tokens, opts.continuation_tokens, opts.windows)
    reviews = None
    if args.reviews and opts.review_windows:
        reviews = read_reviews(Path(args.reviews), opts.review_chars)[:opts.review_windows]
    result = fidelity(model, windows, reviews, batch_size=opts.batch_size)
    result.update(checkpoint=str(args.checkpoint), text=str(args.text), reviews=args.reviews,
                  options=dict(vars(opts)))
    print(fidelity_line(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def add_parser(sub) -> None:
    from ..train.fidelity import FidelityOptions

    p = sub.add_parser(
        "fidelity", formatter_class=HelpFormatter,
        help="how closely a merged model reads like the plain base model (held-out prose, no task training)",
        description="Teacher-force held-out prose windows: the merged model (LoRA on, prompt merged) against the "
                    "plain base model (LoRA off, prompt plain). Prints the continuation perplexity of both and "
                    "their ratio, the top-1 agreement of their next-token argmax and the KL per token; with "
                    "--reviews also how often their sentiment answers on the amazon prompt agree.")
    p.add_argument("--checkpoint", required=True, help="a saved ktm model folder or zoo:NAME")
    p.add_argument("--text", required=True, help="held-out prose: a .jsonl file (field 'text') or .txt file")
    p.add_argument("--reviews", default=None,
                   help="amazon reviews (.jsonl with 'rating' and 'text', e.g. ../shared/data/amazon/dev.jsonl) "
                        "for the answer agreement")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    add_arguments(p, FidelityOptions, title="windows")
    add_base_args(p)
    p.set_defaults(func=cmd_fidelity)
